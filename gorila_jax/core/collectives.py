"""What the processes of a sync run (`--mode sync`) compute together, through jax's
multi-process arrays: the global mesh, global arrays made of each process's own data, a
process's own rows of a global batch, and flags agreed by all.

In a sync run every process joins one `jax.distributed` group for the whole run, and a
learner step is jitted over a `Mesh` of `jax.devices()` (every device of every process):
each process contributes its own replay batch as its rows of one global batch
(`to_global`), params are replicated, and the mean loss over the global batch is an
all-reduce of the gradients (gloo on CPU, NCCL on GPUs): `make_sync_train_step`, the
single process's step with the mean made explicit, one all-reduce that also carries a few
flags the processes agree on. Nothing here knows about processes or sockets beyond what
jax does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gorila_jax.core.learner import BATCH_AXIS, StepMetrics, make_loss_fn, shardings


def global_mesh() -> Mesh:
    """A one-axis mesh over every device of every process; the global batch is split
    along it, each process holding its own rows on its own devices."""
    return Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Each leaf of this process's `tree` as its part of a global array: the process's
    rows of a batch-split sharding, or (replicated) the whole value, which every process
    must then give alike."""
    return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, leaf), tree)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-split global array, in the order it gave them."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def any_process(flags: Sequence[bool]) -> list[bool]:
    """For each flag, whether any process raised it (a collective: every process calls it
    with as many flags, at the same point of its program)."""
    gathered = multihost_utils.process_allgather(np.asarray(flags, dtype=np.int32))
    return [bool(value) for value in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0)]


def broadcast_from_first(tree: Any) -> Any:
    """Process 0's `tree` (numpy leaves) in every process; the others give a tree of the
    same shapes, whose values are ignored."""
    return multihost_utils.broadcast_one_to_all(tree)


def make_sync_train_step(
    network: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    double_dqn: bool,
    huber_delta: float,
    mesh: Mesh,
) -> Callable:
    """Jitted step(params, target, opt_state, batch, weights, flags) -> (params, opt_state,
    metrics, raised): `learner.make_train_step`'s step over every process's devices, that
    also agrees on a few flags.

    Each device takes the gradient of the mean loss over its own rows of the global batch
    (`batch`, `weights` and `flags` are split over `mesh`, one int32 row of flags per
    device; params, target and optimizer state replicated), and one all-reduce averages
    them: a single mean of one vector that holds the flat gradient, the loss metrics and
    the flags. With rows split evenly the mean of the devices' gradients is the gradient
    of the mean over the global batch, so N processes with batch b step as one with batch
    N*b. (Left to XLA, the same step all-reduces a tuple of every gradient array and
    metric, several times slower between processes on the 2-core machine.) Every process
    then applies the same optimizer update. `metrics` are the global
    loss metrics and each row's TD error (split like the batch); `raised` says, for each
    flag, whether any process raised it. Params and optimizer state are donated.

    `q_spread` is the spread over the global batch, as one process would compute it: each
    device writes its rows' values into its own slot of a zero vector that rides in the
    same mean, so every device gets every row's value (a mean of per-device spreads would
    be 0 for a healthy network with one row per device).
    """
    loss_fn = make_loss_fn(
        network, double_dqn=double_dqn, huber_delta=huber_delta, state_values=True
    )
    devices = mesh.size
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def device_part(params, target_params, batch, weights, flags):
        # This device's own gradient: differentiated as they are (the same on every device),
        # the params would get the sum over devices of every array's gradient, one
        # all-reduce each.
        params = jax.tree.map(lambda leaf: jax.lax.pcast(leaf, BATCH_AXIS, to="varying"), params)
        grads, (metrics, values) = grad_fn(params, target_params, batch, weights)
        flat, _ = ravel_pytree(grads)
        scalars = jnp.stack([metrics.loss, metrics.mean_q, metrics.mean_abs_td])
        slots = jnp.zeros((devices, values.shape[0]), flat.dtype)
        slots = slots.at[jax.lax.axis_index(BATCH_AXIS)].set(values.astype(flat.dtype))
        together = jnp.concatenate(
            [flat, scalars, slots.reshape(-1), flags.reshape(-1).astype(flat.dtype)]
        )
        return jax.lax.pmean(together, BATCH_AXIS), metrics.td_errors

    split, whole = P(BATCH_AXIS), P()
    all_devices = jax.shard_map(
        device_part,
        mesh=mesh,
        in_specs=(whole, whole, split, split, split),
        out_specs=(whole, split),
    )

    def step(params, target_params, opt_state, batch, weights, flags):
        mean, td_errors = all_devices(params, target_params, batch, weights, flags)
        flat, unravel = ravel_pytree(params)
        size = flat.size
        updates, opt_state = optimizer.update(unravel(mean[:size]), opt_state, params)
        values_end = size + 3 + batch.action_tm1.shape[0]  # every row's value, over devices
        q_spread = jnp.std(mean[size + 3 : values_end]) * devices
        metrics = StepMetrics(mean[size], mean[size + 1], mean[size + 2], q_spread, td_errors)
        return optax.apply_updates(params, updates), opt_state, metrics, mean[values_end:] > 0

    where = shardings(mesh)
    metrics_sharding = StepMetrics(*(where.replicated,) * 4, where.batch)
    return jax.jit(
        step,
        in_shardings=(where.replicated,) * 3 + (where.batch,) * 3,
        out_shardings=(where.replicated, where.replicated, metrics_sharding, where.replicated),
        donate_argnums=(0, 2),
    )
