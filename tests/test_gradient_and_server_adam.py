"""What a bundle pushes and what the server does with it, against references written apart.

`learner.make_flat_grad_step` is the gradient a bundle pushes: the loss's gradient raveled
in `ravel_pytree` order, cut to the owned elements, clipped to `max_grad_norm` by the norm of
what is pushed, before any split between server shards. The reference here is `jax.grad` of
a DQN loss written out by hand, raveled by hand and clipped in numpy.

The server's Adam is compared with Adam written out in numpy (Kingma & Ba, with optax's
defaults b1 0.9, b2 0.999 and eps outside the square root), not with `make_optimizer`,
which the server itself uses.
"""

import dataclasses
import threading

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from gorila_jax.core.config import Config
from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.core.learner import local_mesh, make_flat_grad_step
from gorila_jax.core.networks import MLP
from gorila_jax.core.replay import Transition
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

BATCH, OBS, ACTIONS, GAMMA = 8, 4, 3, 0.9


def setting(seed: int = 0):
    """A small MLP, its params and target params, and a 1-step batch with weights."""
    rng = np.random.default_rng(seed)
    network = MLP(num_actions=ACTIONS, hidden=(8, 8))
    obs = rng.standard_normal((BATCH, 1, OBS)).astype(np.float32)
    params = network.init(jax.random.key(seed), obs)
    target = network.init(jax.random.key(seed + 1), obs)
    batch = Transition(
        obs_tm1=obs,
        action_tm1=rng.integers(0, ACTIONS, BATCH).astype(np.int32),
        rewards=(3.0 * rng.standard_normal((BATCH, 1))).astype(np.float32),
        discounts=np.where(rng.random((BATCH, 1)) < 0.25, 0.0, GAMMA).astype(np.float32),
        obs_t=rng.standard_normal((BATCH, 1, OBS)).astype(np.float32),
    )
    weights = rng.uniform(0.5, 1.5, BATCH).astype(np.float32)
    return network, params, target, batch, weights


def reference_gradient(network, params, target, batch, weights) -> dict:
    """jax.grad of the 1-step DQN loss written out: weighted mean Huber (delta 1) of
    r + discount * max_a Q_target(s', a) - Q(s, a)."""
    bootstrap = np.max(np.asarray(network.apply(target, batch.obs_t)), axis=1)
    targets = batch.rewards[:, 0] + batch.discounts[:, 0] * bootstrap

    def loss(p):
        q = network.apply(p, batch.obs_tm1)[jnp.arange(BATCH), batch.action_tm1]
        td = targets - q
        huber = jnp.where(jnp.abs(td) <= 1.0, 0.5 * td**2, jnp.abs(td) - 0.5)
        return jnp.mean(weights * huber)

    return jax.device_get(jax.grad(loss)(params))


def ravel_by_hand(tree) -> np.ndarray:
    """ravel_pytree's order written out: mapping keys sorted, depth first, leaves C order."""
    if isinstance(tree, dict):
        return np.concatenate([ravel_by_hand(tree[key]) for key in sorted(tree)])
    return np.asarray(tree, np.float64).ravel()


def clip_by_hand(vector: np.ndarray, max_norm: float) -> np.ndarray:
    norm = np.sqrt(np.sum(vector.astype(np.float64) ** 2))
    return vector * min(1.0, max_norm / norm)


def grad_step(network, **kwargs):
    return make_flat_grad_step(network, double_dqn=False, huber_delta=1.0, mesh=local_mesh(),
                               **kwargs)  # fmt: skip


def test_flat_gradient_is_the_whole_gradient_clipped_in_ravel_order():
    """Catches a pushed vector in another order than the server's (leaves not in ravel_pytree
    order, or a leaf in Fortran order), clipping by the norm of each leaf or each server
    shard's slice instead of the whole vector, no clipping, and a clip that scales a
    gradient already under the norm."""
    network, params, target, batch, weights = setting()
    want = ravel_by_hand(reference_gradient(network, params, target, batch, weights))
    # The layout is the one the server unravels with (the first leaf: hidden0's bias).
    assert want.size == 4 * 8 + 8 + 8 * 8 + 8 + 8 * ACTIONS + ACTIONS
    norm = np.linalg.norm(want)
    max_norm = norm / 3.0  # clipping must act
    got, metrics = grad_step(network, max_grad_norm=max_norm)(params, target, batch, weights)
    got = np.asarray(got)
    np.testing.assert_allclose(got, clip_by_hand(want, max_norm), rtol=2e-5, atol=1e-7)
    assert np.linalg.norm(got) == pytest.approx(max_norm, rel=1e-5)
    # One factor for every element: the slices two server shards get are not each clipped.
    halves = ShardLayout.even(want.size, 2).split(got)
    assert all(np.linalg.norm(h) < max_norm * 0.99 for h in halves)
    nonzero = np.abs(want) > 1e-6  # dead ReLUs leave some elements at 0
    np.testing.assert_allclose(got[nonzero] / want[nonzero], 1 / 3.0, rtol=1e-4)
    assert np.isfinite(float(metrics.loss))

    unclipped, _ = grad_step(network, max_grad_norm=norm * 2)(params, target, batch, weights)
    np.testing.assert_allclose(np.asarray(unclipped), want, rtol=2e-5, atol=1e-7)
    no_clip, _ = grad_step(network, max_grad_norm=None)(params, target, batch, weights)
    np.testing.assert_allclose(np.asarray(no_clip), want, rtol=2e-5, atol=1e-7)


def test_owned_part_is_returned_and_clipped_by_its_own_norm():
    """Under gradient sharding: catches returning the whole vector, the wrong elements (an
    owned set taken from an unsorted permutation, or by position instead of index), and a
    clip by the norm of the whole gradient rather than of what is pushed (the server
    checks the pushed vector's norm against max_grad_norm)."""
    network, params, target, batch, weights = setting(seed=3)
    whole = ravel_by_hand(reference_gradient(network, params, target, batch, weights))
    owned = part_indices(whole.size, 3, 1, "default", seed=11)
    assert owned is not None and 0 < len(owned) < whole.size
    part = whole[owned]
    max_norm = np.linalg.norm(part) / 2.0
    got, _ = grad_step(network, owned=owned, max_grad_norm=max_norm)(params, target, batch, weights)
    got = np.asarray(got)
    assert got.shape == (len(owned),)
    np.testing.assert_allclose(got, clip_by_hand(part, max_norm), rtol=2e-5, atol=1e-7)
    assert np.linalg.norm(got) == pytest.approx(max_norm, rel=1e-5)
    # Not the whole gradient clipped, then cut (that would be smaller than the clip allows).
    cut_after = clip_by_hand(whole, max_norm)[owned]
    assert not np.allclose(got, cut_after, rtol=1e-3)
    unclipped, _ = grad_step(network, owned=owned, max_grad_norm=None)(
        params, target, batch, weights
    )
    np.testing.assert_allclose(np.asarray(unclipped), part, rtol=2e-5, atol=1e-7)


# ---- the server's Adam ----------------------------------------------------------------------

SECRET = credentials.new_run_secret()


def authority(num_workers: int) -> WorkerAuthority:
    return WorkerAuthority(num_workers, secret=SECRET)


class NumpyAdam:
    """Adam as in Kingma & Ba (2015), float64: bias-corrected moments, eps outside the root."""

    def __init__(self, params: np.ndarray, lr: float, eps: float, b1=0.9, b2=0.999):
        self.params = params.astype(np.float64)
        self.m = np.zeros_like(self.params)
        self.v = np.zeros_like(self.params)
        self.t = 0
        self.lr, self.eps, self.b1, self.b2 = lr, eps, b1, b2

    def step(self, grad: np.ndarray) -> np.ndarray:
        grad = grad.astype(np.float64)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        self.params = self.params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return self.params


def request(server, kind, arrays=(), *, seq, version=-1, **fields) -> transport.Message:
    header = transport.make_header(
        kind, credential=credentials.worker_credential(SECRET, 0), worker=0, seq=seq,
        version=version,
        fingerprint=server.fingerprint, **fields,
    )  # fmt: skip
    size = server.num_params
    return transport.decode_reply(
        server.handle(transport.encode(header, arrays)),
        expected_fingerprint=server.fingerprint,
        layout_for=lambda h: size if h["kind"] in ("welcome", "params") else None,
        max_bytes=1 << 20,
    )


@pytest.mark.parametrize("eps", [1e-8, 0.05])
def test_server_adam_matches_adam_written_out(eps):
    """Catches a server Adam without bias correction, with b1 and b2 swapped, eps inside
    the square root (visible with eps 0.05), the step count not advancing, the update
    added instead of subtracted, or a learning rate taken from elsewhere; 8 pushes of
    random gradients of varied scale, each compared with the numpy reference."""
    rng = np.random.default_rng(int(eps * 1e9) % 1000)
    tree = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
    }
    lr = 0.01
    config = dataclasses.replace(
        Config(), env_id="CartPole-v1", optimizer="adam", learning_rate=lr, optimizer_eps=eps,
        max_grad_norm=1000.0, dc_asgd="off", outlier_k=0.0, seed=1,
    )  # fmt: skip
    server = ParameterServer(config, tree, num_workers=1, authority=authority(1))
    initial = np.concatenate([tree["a"].ravel(), tree["b"]])  # ravel order: a, then b
    np.testing.assert_array_equal(np.asarray(server.params), initial)
    reference = NumpyAdam(initial, lr, eps)
    seq = 1
    version = request(server, "hello", seq=seq).header["version"]
    for step in range(8):
        scale = 10.0 ** rng.uniform(-3, 1)
        grad = (scale * rng.standard_normal(initial.size)).astype(np.float32)
        seq += 1
        ack = request(server, "push", [grad], seq=seq, version=version, mean_abs_td=1.0,
                      frames=10)  # fmt: skip
        assert ack.header["accepted"], ack.header
        version += 1
        want = reference.step(grad)
        chex.assert_trees_all_close(
            np.asarray(server.params, np.float64), want, rtol=1e-5, atol=1e-6
        )
        assert server.version == step + 1
    assert not np.allclose(np.asarray(server.params), initial, atol=1e-3)


# ---- from a bundle's learner step to the server's params --------------------------------------


class PushRecorder:
    """A server connection for RemoteLearner: welcomes with `flat` at version 0, keeps every
    push with its fields, acknowledges it; no server behind it."""

    worker = 0

    def __init__(self, flat: np.ndarray):
        self.flat = flat
        self.num_params = flat.size
        self.timeout_seconds = 5.0
        self.cancel = threading.Event()
        self.pushed: list[tuple[np.ndarray, dict]] = []
        self.seq = 0

    def hello(self):
        info = {
            "num_params": self.num_params,
            "server_shard": 0,
            "num_workers": 1,
            "shard_layout": [0, self.num_params],
            "part_size": self.num_params,
            "frames": 0,
        }
        return self.flat.copy(), 0, info  # fmt: skip

    def send_push(self, grads, **fields) -> int:
        self.pushed.append((np.array(grads), fields))
        self.seq += 1
        return self.seq

    def receive_ack(self, seq: int, **_):
        return True, None, seq

    def send_pull(self, have_version: int) -> int:
        self.seq += 1
        return self.seq

    def receive_pulled(self, seq: int, **_):
        return None, 0

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_bundles_push_is_the_reference_step_and_the_server_applies_it():
    """One learner step of a bundle (`RemoteLearner.learn`, with its own target network)
    pushes jax.grad of the hand-written loss, raveled and clipped by hand; the server, sent
    that very push through `handle`, moves its params by one numpy Adam step of it.
    Catches a bundle that differentiates with the target and online params swapped (or
    the target taken for the online params), pushes an unclipped or stale-batch gradient,
    stamps the wrong base version or frames, and a server that applies to a push something
    else than what the bundle computed (another slice, another order, a rescaling)."""
    from gorila_jax.bundle.remote_learner import RemoteLearner
    from gorila_jax.core.replay import Sample

    network, params, target, batch, weights = setting(seed=5)
    flat = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    want = ravel_by_hand(reference_gradient(network, params, target, batch, weights))
    max_norm = float(np.linalg.norm(want) / 2)  # the clip acts
    lr = 0.01
    config = dataclasses.replace(
        Config(), env_id="CartPole-v1", double_dqn=False, huber_delta=1.0, n_step=1,
        gamma=GAMMA, max_grad_norm=max_norm, optimizer="adam", learning_rate=lr,
        optimizer_eps=1e-8, dc_asgd="off", outlier_k=0.0, sync_every=1000, seed=1,
    )  # fmt: skip
    connection = PushRecorder(flat)
    learner = RemoteLearner(config, network, params, [connection], num_workers=1)
    try:
        # as a target refresh would leave it
        learner.state = learner.state._replace(target_params=jax.device_put(target))
        learner.learn(Sample(batch, np.arange(BATCH), weights), frames=1234)
    finally:
        learner.close()
    assert len(connection.pushed) == 1
    pushed, fields = connection.pushed[0]
    np.testing.assert_allclose(pushed, clip_by_hand(want, max_norm), rtol=2e-5, atol=1e-7)
    assert fields["base_version"] == 0 and fields["frames"] == 1234

    server = ParameterServer(config, params, num_workers=1, authority=authority(1))
    np.testing.assert_array_equal(np.asarray(server.params), flat)
    assert request(server, "hello", seq=1).header["version"] == 0
    ack = request(server, "push", [pushed], seq=2, version=fields.pop("base_version"), **fields)
    assert ack.header["accepted"] and server.version == 1, ack.header
    reference = NumpyAdam(flat, lr, 1e-8).step(clip_by_hand(want, max_norm))
    np.testing.assert_allclose(np.asarray(server.params, np.float64), reference, atol=1e-6)
    assert np.abs(np.asarray(server.params) - flat).max() == pytest.approx(lr, rel=1e-3)


# ---- the server's delay compensation, written out ----------------------------------------------


def test_server_adaptive_dc_asgd_compensates_a_stale_push_as_written_out():
    """DC-ASGD-a on the server, against the paper's formulas in numpy: a push on the
    current params is applied as it came (its square still enters the running mean
    square), a push one update stale is applied as g + lambda / sqrt(ms + eps) * g * g *
    (w - w_bak), with w_bak the params that bundle was sent. Catches compensation that never
    happens (the transform left out of the chain, or stale params equal to the current
    ones), the correction's sign flipped or taken from the wrong params, a mean square
    updated after instead of before the correction, or lambda not scaled by it."""
    lam, lr, momentum, eps = 2.0, 0.1, 0.95, 1e-7
    rng = np.random.default_rng(7)
    tree = {"w": rng.standard_normal(12).astype(np.float32)}
    config = dataclasses.replace(
        Config(), env_id="CartPole-v1", optimizer="sgd", learning_rate=lr, dc_asgd="adaptive",
        dc_asgd_lambda=lam, max_grad_norm=1000.0, outlier_k=0.0, seed=1,
    )  # fmt: skip
    server = ParameterServer(config, tree, num_workers=2, authority=authority(2))

    def send(worker, kind, arrays=(), *, seq, version=-1, **fields) -> transport.Message:
        header = transport.make_header(
            kind, credential=credentials.worker_credential(SECRET, worker), worker=worker,
            seq=seq, version=version,
            fingerprint=server.fingerprint, **fields,
        )  # fmt: skip
        return transport.decode_reply(
            server.handle(transport.encode(header, arrays)),
            expected_fingerprint=server.fingerprint,
            layout_for=lambda h: 12 if h["kind"] in ("welcome", "params") else None,
            max_bytes=1 << 20,
        )

    w0 = send(0, "hello", seq=1).arrays[0].astype(np.float64)
    np.testing.assert_array_equal(send(1, "hello", seq=1).arrays[0], w0)
    g1, g2 = (rng.standard_normal(12).astype(np.float32) * 3 for _ in range(2))
    push = dict(mean_abs_td=1.0, frames=10)
    assert send(0, "push", [g1], seq=2, version=0, **push).header["accepted"]
    ms = (1 - momentum) * g1.astype(np.float64) ** 2
    w1 = w0 - lr * g1  # on the current params: nothing to compensate
    np.testing.assert_allclose(np.asarray(server.params), w1, rtol=1e-6, atol=1e-6)

    assert send(1, "push", [g2], seq=2, version=0, **push).header["accepted"]  # 1 stale
    g = g2.astype(np.float64)
    ms = momentum * ms + (1 - momentum) * g**2
    correction = lam / np.sqrt(ms + eps) * g * g * (w1 - w0)
    want = w1 - lr * (g + correction)
    np.testing.assert_allclose(np.asarray(server.params), want, rtol=1e-5, atol=1e-6)
    uncompensated = w1 - lr * g
    assert np.abs(want - uncompensated).max() > 100 * 1e-6  # the correction is visible
