"""Learner targets and loss against hand-computed numpy references on random inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gorila_jax.core.learner import (
    bootstrap_values,
    local_mesh,
    make_grad_step,
    make_loss_fn,
    multistep_targets,
)
from gorila_jax.core.networks import MLP, NatureCNN, NatureCNNReference
from gorila_jax.core.replay import Transition


def reference_targets(rewards, discounts, q_next_target, q_next_online, double):
    """Loop-by-loop numpy reference of the n-step (Double) DQN target."""
    batch, n = rewards.shape
    out = np.zeros(batch)
    for b in range(batch):
        if double:
            bootstrap = q_next_target[b, np.argmax(q_next_online[b])]
        else:
            bootstrap = np.max(q_next_target[b])
        total, scale = 0.0, 1.0
        for i in range(n):
            total += scale * rewards[b, i]
            scale *= discounts[b, i]
        out[b] = total + scale * bootstrap
    return out


@pytest.mark.parametrize("n_step", [1, 3, 5])
@pytest.mark.parametrize("double", [False, True])
def test_targets_match_reference(n_step, double):
    rng = np.random.default_rng(n_step + 10 * double)
    batch, actions, gamma = 16, 6, 0.97
    rewards = rng.normal(size=(batch, n_step)).astype(np.float32)
    terminal = rng.random((batch, n_step)) < 0.2
    discounts = np.where(terminal, 0.0, gamma).astype(np.float32)
    q_target = rng.normal(size=(batch, actions)).astype(np.float32)
    q_online = rng.normal(size=(batch, actions)).astype(np.float32)
    got = jax.jit(lambda r, d, qt, qo: multistep_targets(r, d, bootstrap_values(qt, qo)))(
        rewards, discounts, q_target, q_online if double else None
    )
    want = reference_targets(rewards, discounts, q_target, q_online, double)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_terminal_transition_ignores_bootstrap():
    rewards = np.array([[1.0, 2.0, 4.0]], np.float32)
    discounts = np.array([[0.9, 0.0, 0.9]], np.float32)  # terminal on the second step
    got = multistep_targets(rewards, discounts, jnp.array([1000.0]))
    np.testing.assert_allclose(np.asarray(got), [1.0 + 0.9 * 2.0], rtol=1e-6)


def test_double_dqn_differs_from_dqn_when_nets_disagree():
    q_target = jnp.array([[1.0, 5.0]])
    q_online = jnp.array([[3.0, 0.0]])
    assert float(bootstrap_values(q_target, None)[0]) == 5.0
    assert float(bootstrap_values(q_target, q_online)[0]) == 1.0


def test_optax_huber_matches_piecewise_reference():
    """The loss uses optax's Huber loss: the DQN paper's piecewise form, checked here."""
    x = np.linspace(-3, 3, 61).astype(np.float32)
    want = np.where(np.abs(x) <= 1.5, 0.5 * x**2, 1.5 * (np.abs(x) - 0.75))
    got = optax.losses.huber_loss(jnp.asarray(x), delta=1.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_shape_contracts_name_the_bad_input():
    rewards = jnp.zeros((4, 3))
    with pytest.raises(AssertionError, match="rank"):
        multistep_targets(rewards, jnp.zeros((4, 3)), jnp.zeros((4, 1)))
    with pytest.raises(AssertionError, match="shape"):
        multistep_targets(rewards, jnp.zeros((4, 2)), jnp.zeros(4))
    with pytest.raises(AssertionError):
        bootstrap_values(jnp.zeros((4, 6)), jnp.zeros((4, 5)))
    network = MLP(num_actions=2, hidden=(4,))
    batch = random_batch(np.random.default_rng(0), 6, (1, 4), 2, 2)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    loss_fn = make_loss_fn(network, double_dqn=False, huber_delta=1.0)
    with pytest.raises(AssertionError, match="shape"):
        jax.jit(loss_fn)(params, params, batch, np.ones(5, np.float32))  # 5 weights for 6


def test_loss_under_fake_jit_equals_the_jitted_loss():
    """chex.fake_jit runs the pure loss eagerly (print and breakpoint work inside it) and
    gives the same numbers as the compiled one."""
    rng = np.random.default_rng(5)
    network = MLP(num_actions=3, hidden=(8,))
    batch = random_batch(rng, 8, (1, 4), 3, 3)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    weights = rng.random(8).astype(np.float32)
    loss_fn = make_loss_fn(network, double_dqn=True, huber_delta=1.0)
    compiled = jax.jit(loss_fn)(params, params, batch, weights)
    with chex.fake_jit():
        eager = jax.jit(loss_fn)(params, params, batch, weights)
    chex.assert_trees_all_close(eager, compiled, rtol=1e-5, atol=1e-6)


def random_batch(rng, batch, obs_shape, n_step, actions, dtype=np.float32):
    if dtype == np.uint8:
        obs = lambda: rng.integers(0, 256, (batch, *obs_shape), dtype=np.uint8)  # noqa: E731
    else:
        obs = lambda: rng.normal(size=(batch, *obs_shape)).astype(dtype)  # noqa: E731
    return Transition(
        obs_tm1=obs(),
        action_tm1=rng.integers(0, actions, batch).astype(np.int32),
        rewards=rng.normal(size=(batch, n_step)).astype(np.float32),
        discounts=np.where(rng.random((batch, n_step)) < 0.1, 0.0, 0.99).astype(np.float32),
        obs_t=obs(),
    )


@pytest.mark.parametrize("double", [False, True])
def test_loss_and_td_errors_match_reference(double):
    rng = np.random.default_rng(3)
    network = MLP(num_actions=3, hidden=(8,))
    batch = random_batch(rng, 10, (1, 4), 2, 3)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    target_params = network.init(jax.random.key(1), batch.obs_tm1)
    weights = rng.random(10).astype(np.float32)
    loss_fn = make_loss_fn(network, double_dqn=double, huber_delta=1.0)
    loss, metrics = jax.jit(loss_fn)(params, target_params, batch, weights)

    q_tm1 = np.asarray(network.apply(params, batch.obs_tm1))
    q_next_target = np.asarray(network.apply(target_params, batch.obs_t))
    q_next_online = np.asarray(network.apply(params, batch.obs_t))
    targets = reference_targets(
        batch.rewards, batch.discounts, q_next_target, q_next_online, double
    )
    td = targets - q_tm1[np.arange(10), batch.action_tm1]
    abs_td = np.abs(td)
    want_loss = np.mean(weights * np.where(abs_td <= 1, 0.5 * td**2, abs_td - 0.5))
    np.testing.assert_allclose(np.asarray(metrics.td_errors), td, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
    # q_spread: the population standard deviation of each state's value max_a Q.
    values = [max(row) for row in q_tm1.tolist()]
    mean_value = sum(values) / len(values)
    want_spread = (sum((v - mean_value) ** 2 for v in values) / len(values)) ** 0.5
    np.testing.assert_allclose(float(metrics.q_spread), want_spread, rtol=1e-4)


def test_q_spread_is_zero_for_a_collapsed_network_and_not_at_init():
    """A network whose first layer's units are all dead (ReLU of a negative constant: the
    kernel zero, the bias negative) gives every state the same Q-values, as the dead Pong
    run did; `q_spread` is then exactly 0 and the bundle loop's test calls it collapsed,
    while the same network at init tells random states apart. Catches a spread over the
    actions instead of the states (not 0 here) and a mean in place of a spread."""
    from gorila_jax.bundle.loop import collapsed

    rng = np.random.default_rng(7)
    network = MLP(num_actions=3, hidden=(8,))
    batch = random_batch(rng, 16, (1, 4), 1, 3)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    loss_fn = jax.jit(make_loss_fn(network, double_dqn=False, huber_delta=1.0))
    weights = np.ones(16, np.float32)
    _, healthy = loss_fn(params, params, batch, weights)
    dead = jax.tree.map(lambda x: x, params)  # new dicts, the same arrays
    dead["params"]["hidden0"] = {"kernel": jnp.zeros((4, 8)), "bias": -jnp.ones(8)}
    dead["params"]["QHead_0"]["q"]["bias"] = jnp.array([0.5, -1.0, 2.0])
    q_dead = np.asarray(network.apply(dead, batch.obs_tm1))
    assert np.ptp(q_dead, axis=1).max() > 0  # the actions still differ: only states do not
    _, gone = loss_fn(dead, dead, batch, weights)
    assert float(gone.q_spread) == 0.0
    assert float(healthy.q_spread) > 1e-3
    record = {"mean_q": float(gone.mean_q), "q_spread": float(gone.q_spread)}
    assert collapsed(record)
    assert not collapsed({"mean_q": float(healthy.mean_q), "q_spread": float(healthy.q_spread)})


def test_nature_cnn_shapes_and_dueling():
    frames = np.zeros((2, 4, 84, 84), np.uint8)
    for dueling in (False, True):
        network = NatureCNN(num_actions=6, dueling=dueling)
        params = network.init(jax.random.key(0), frames)
        q = network.apply(params, frames)
        chex.assert_shape(q, (2, 6))
        chex.assert_tree_all_finite(q)
    assert "advantage" in str(jax.tree_util.tree_structure(params))


@pytest.mark.parametrize("dueling", [False, True])
def test_nature_cnn_equals_native_convolutions(dueling):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (3, 4, 84, 84), dtype=np.uint8)
    fast = NatureCNN(num_actions=5, dueling=dueling)
    reference = NatureCNNReference(num_actions=5, dueling=dueling)
    params = fast.init(jax.random.key(2), frames)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, reference.init(jax.random.key(2), frames))
    chex.assert_trees_all_close(
        fast.apply(params, frames), reference.apply(params, frames), rtol=1e-4, atol=1e-4
    )
    loss = lambda net: lambda p: jnp.sum(net.apply(p, frames) ** 2)  # noqa: E731
    chex.assert_trees_all_close(
        jax.grad(loss(fast))(params), jax.grad(loss(reference))(params), rtol=2e-3, atol=1e-4
    )


def test_grad_step_over_one_device_matches_unsharded_grad():
    rng = np.random.default_rng(4)
    network = MLP(num_actions=2, hidden=(16, 16))
    batch = random_batch(rng, 8, (1, 4), 1, 2)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    weights = np.ones(8, np.float32)
    step = make_grad_step(
        network, double_dqn=True, huber_delta=1.0, mesh=local_mesh(jax.devices()[:1])
    )
    grads, _ = step(params, params, batch, weights)
    loss_fn = make_loss_fn(network, double_dqn=True, huber_delta=1.0)
    want, _ = jax.grad(loss_fn, has_aux=True)(params, params, batch, weights)
    chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)
