"""The DQN learner: pure target and loss functions, and jitted steps over all local devices.

Targets follow rlax's conventions: a batch carries `rewards` and `discounts` of shape
(batch, n) with gamma already folded into `discounts` (0 after a terminal step), so one
function serves the 1-step and the n-step target:

    G = sum_i (prod_{k<i} discounts_k) * rewards_i + (prod_i discounts_i) * bootstrap

`bootstrap` is max_a Q_target(s', a) (DQN) or Q_target(s', argmax_a Q_online(s', a))
(Double DQN). The loss is the importance-weighted Huber loss of the TD error (optax's).
Each pure function checks the shapes it is given with chex (at trace time, so for free in
the jitted steps): a batch of the wrong rank or size fails with a message naming it.

Steps are jitted once over a `Mesh` of `jax.local_devices()`: the batch is split along the
mesh's one axis and parameters are replicated, so XLA inserts the all-reduce of the
gradients. Synchronous inside a process; the parameter server makes it asynchronous between
processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gorila_jax.core.replay import Transition

Params = Any
BATCH_AXIS = "batch"


class StepMetrics(NamedTuple):
    """What one learner step reports; `td_errors` has one entry per sample.

    `q_spread` is the standard deviation over the batch of each state's value
    max_a Q(s, a). It is 0 when the network gives every state the same Q-values: a
    collapsed network (every unit of a layer dead, say) that nothing can train again. A
    random initial network already tells Pong's states apart (about 0.003 at seed 1).
    """

    loss: jnp.ndarray
    mean_q: jnp.ndarray
    mean_abs_td: jnp.ndarray
    q_spread: jnp.ndarray
    td_errors: jnp.ndarray


def multistep_targets(
    rewards: jnp.ndarray, discounts: jnp.ndarray, bootstrap: jnp.ndarray
) -> jnp.ndarray:
    """n-step returns: rewards/discounts (batch, n), bootstrap (batch,) -> targets (batch,)."""
    chex.assert_rank([rewards, discounts, bootstrap], [2, 2, 1])
    chex.assert_equal_shape([rewards, discounts])
    chex.assert_shape(bootstrap, rewards.shape[:1])
    kept = jnp.cumprod(discounts, axis=1)
    before = jnp.concatenate([jnp.ones_like(kept[:, :1]), kept[:, :-1]], axis=1)
    return jnp.sum(before * rewards, axis=1) + kept[:, -1] * bootstrap


def bootstrap_values(q_next_target: jnp.ndarray, q_next_online: jnp.ndarray | None) -> jnp.ndarray:
    """Value of the next state: max of the target net, or Double DQN when online is given."""
    chex.assert_rank(q_next_target, 2)
    if q_next_online is None:
        return jnp.max(q_next_target, axis=-1)
    chex.assert_equal_shape([q_next_target, q_next_online])
    best = jnp.argmax(q_next_online, axis=-1)
    return jnp.take_along_axis(q_next_target, best[:, None], axis=-1)[:, 0]


def make_loss_fn(
    network: nn.Module, *, double_dqn: bool, huber_delta: float, state_values: bool = False
) -> Callable:
    """Build loss(params, target_params, batch, weights) -> (loss, StepMetrics), or with
    `state_values` -> (loss, (StepMetrics, each row's max_a Q(s, a))): a step that splits
    the batch over devices by hand needs the rows' values for the global `q_spread`."""

    def loss_fn(params, target_params, batch: Transition, weights):
        batch_size = batch.action_tm1.shape[0]
        chex.assert_shape([batch.action_tm1, weights], (batch_size,))
        chex.assert_equal_shape([batch.obs_tm1, batch.obs_t])
        chex.assert_axis_dimension(batch.obs_tm1, 0, batch_size)
        q_tm1 = network.apply(params, batch.obs_tm1)
        q_next_online = None
        if double_dqn:
            q_next_online = network.apply(jax.lax.stop_gradient(params), batch.obs_t)
        q_next_target = network.apply(target_params, batch.obs_t)
        targets = multistep_targets(
            batch.rewards, batch.discounts, bootstrap_values(q_next_target, q_next_online)
        )
        q_taken = jnp.take_along_axis(q_tm1, batch.action_tm1[:, None].astype(jnp.int32), axis=-1)
        td_errors = jax.lax.stop_gradient(targets) - q_taken[:, 0]
        values = jax.lax.stop_gradient(jnp.max(q_tm1, axis=-1))
        loss = jnp.mean(weights * optax.losses.huber_loss(td_errors, delta=huber_delta))
        metrics = StepMetrics(
            loss=loss,
            mean_q=jnp.mean(q_taken),
            mean_abs_td=jnp.mean(jnp.abs(td_errors)),
            q_spread=jnp.std(values),
            td_errors=td_errors,
        )
        return loss, ((metrics, values) if state_values else metrics)

    return loss_fn


def local_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh over this process's devices; the batch is split along it."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


class Shardings(NamedTuple):
    """Where each input of a step lives: parameters everywhere, the batch split."""

    replicated: NamedSharding
    batch: NamedSharding


def shardings(mesh: Mesh) -> Shardings:
    """Replicated and batch-split shardings over `mesh`."""
    return Shardings(NamedSharding(mesh, P()), NamedSharding(mesh, P(BATCH_AXIS)))


def make_grad_step(
    network: nn.Module, *, double_dqn: bool, huber_delta: float, mesh: Mesh
) -> Callable:
    """Jitted grad_step(params, target_params, batch, weights) -> (grads, StepMetrics),
    the pytree gradient (benchmarks and tests; bundles push `make_flat_grad_step`'s)."""
    loss_fn = make_loss_fn(network, double_dqn=double_dqn, huber_delta=huber_delta)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    where = shardings(mesh)
    metrics_sharding = StepMetrics(*(where.replicated,) * 4, where.batch)
    return jax.jit(
        grad_fn,
        in_shardings=(where.replicated, where.replicated, where.batch, where.batch),
        out_shardings=(where.replicated, metrics_sharding),
    )


def make_flat_grad_step(
    network: nn.Module,
    *,
    double_dqn: bool,
    huber_delta: float,
    mesh: Mesh,
    owned: np.ndarray | None = None,
    max_grad_norm: float | None = None,
) -> Callable:
    """Jitted flat_grad_step(params, target, batch, weights) -> (flat gradient, StepMetrics).

    The gradient a Gorila bundle pushes: the pytree gradient of `make_grad_step` raveled
    into one float32 vector (`ravel_pytree` order, the server's layout), under gradient
    sharding restricted to the `owned` flat indices, and clipped to `max_grad_norm` (its
    global norm: the norm of what is pushed). Clipping happens here, before the vector is
    split between server shards, so that S shards apply what one server would (the
    server's optimizer chain does not clip again). Replicated over the mesh, like params.
    """
    loss_fn = make_loss_fn(network, double_dqn=double_dqn, huber_delta=huber_delta)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    owned_indices = None if owned is None else jnp.asarray(owned)
    clip = None if not max_grad_norm else optax.clip_by_global_norm(max_grad_norm)

    def flat_grad_step(params, target_params, batch, weights):
        grads, metrics = grad_fn(params, target_params, batch, weights)
        flat, _ = ravel_pytree(grads)
        pushed = flat if owned_indices is None else flat[owned_indices]
        if clip is not None:
            pushed, _ = clip.update(pushed, clip.init(pushed))
        return pushed, metrics

    where = shardings(mesh)
    return jax.jit(
        flat_grad_step,
        in_shardings=(where.replicated, where.replicated, where.batch, where.batch),
        out_shardings=where.replicated,
    )


def make_train_step(
    network: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    double_dqn: bool,
    huber_delta: float,
    mesh: Mesh,
) -> Callable:
    """Jitted train_step(params, target, opt_state, batch, weights) -> (params, opt_state, metrics).

    Gradient and optimizer update fused in one program for single-process training; params
    and optimizer state are donated, so they are updated in place.
    """
    loss_fn = make_loss_fn(network, double_dqn=double_dqn, huber_delta=huber_delta)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(params, target_params, opt_state, batch, weights):
        grads, metrics = grad_fn(params, target_params, batch, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    where = shardings(mesh)
    metrics_sharding = StepMetrics(*(where.replicated,) * 4, where.batch)
    return jax.jit(
        train_step,
        in_shardings=(
            where.replicated,
            where.replicated,
            where.replicated,
            where.batch,
            where.batch,
        ),
        out_shardings=(where.replicated, where.replicated, metrics_sharding),
        donate_argnums=(0, 2),
    )


def copy_params(params: Params) -> Params:
    """A fresh copy (target networks must not alias donated online params)."""
    return jax.tree.map(jnp.copy, params)
