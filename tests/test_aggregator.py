"""The per-host aggregator (`--aggregate-per-host`): what it forwards (the mean of the
gradients received since its last forward, with the oldest versions per shard and its
bundles' frames summed), what it refuses on its bundles' behalf, its answers to hellos and
pulls, and a real one in front of 1 and 2 real shards with bundles' connections."""

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax.aggregator import aggregator as aggregator_module
from gorila_jax.aggregator.aggregator import Aggregator
from gorila_jax.bundle.client import Pulled, ServerConnection, ShardedClient
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.core.networks import MLP
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

SECRET = credentials.new_run_secret()
FINGERPRINT = "f" * 16
NUM_PARAMS = 64


class FakeUpstream:
    """A stand-in for the aggregator's client of the shards: records what it is given."""

    def __init__(self, flat: np.ndarray, versions: tuple[int, ...]):
        self.initial = Pulled(flat, versions)
        self.pushed = []
        self.room = True
        self.pulls = 0
        self.fetched: Pulled | None = None
        self.accepted, self.rejected, self.reconnects, self.error = 0, {}, 0, None
        self.connections = [None] * len(versions)

    def has_room(self) -> bool:
        return self.room

    def push(self, item) -> None:
        self.pushed.append(item)

    def pull(self) -> None:
        self.pulls += 1

    def latest(self):
        fetched, self.fetched = self.fetched, None
        return fetched, None

    def failed(self) -> bool:
        return False


def config(**overrides):
    return dataclasses.replace(cartpole_defaults(), max_grad_norm=10.0, **overrides)


class Timer:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def aggregator(upstream, workers=(0, 1), timer=None, **overrides) -> Aggregator:
    return Aggregator(
        config(**overrides), upstream, workers=workers,
        authority=WorkerAuthority(3, secret=SECRET), fingerprint=FINGERPRINT,
        timer=timer or Timer(),
    )  # fmt: skip


class Bundle:
    """Builds a bundle's requests by hand and reads the aggregator's replies."""

    def __init__(self, worker: int, credential: str | None = None):
        self.worker = worker
        self.credential = credential or credentials.worker_credential(SECRET, worker)
        self.seq = time.time_ns()

    def request(self, hub: Aggregator, kind: str, arrays=(), *, version=-1, seq=None, **fields):
        self.seq = self.seq + 1 if seq is None else seq
        header = transport.make_header(
            kind, credential=self.credential, worker=self.worker, seq=self.seq,
            version=version, fingerprint=FINGERPRINT, **fields,
        )  # fmt: skip
        frames = [bytes(frame) for frame in transport.encode(header, arrays)]
        reply = hub.submit(frames)
        return transport.decode_reply(
            [bytes(frame) for frame in reply],
            expected_fingerprint=FINGERPRINT,
            layout_for=lambda h: NUM_PARAMS if h["kind"] in ("welcome", "params") else None,
            max_bytes=hub.max_bytes,
        )

    def push(self, hub, grads, version, *, td=1.0, frames=100, **kwargs):
        return self.request(
            hub, "push", [np.asarray(grads, np.float32)], version=version,
            mean_abs_td=td, frames=frames, **kwargs,
        )  # fmt: skip


def gradient(rng, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(NUM_PARAMS) / np.sqrt(NUM_PARAMS)).astype(np.float32)


def test_the_gradients_since_the_last_forward_go_as_their_mean_with_the_oldest_versions():
    rng = np.random.default_rng(0)
    upstream = FakeUpstream(np.zeros(NUM_PARAMS, np.float32), (10, 12))
    hub = aggregator(upstream)
    assert hub.version == 11  # the mean of the shards' versions, as a sharded bundle counts
    one, two = Bundle(0), Bundle(1)
    g1, g2, g3 = gradient(rng), gradient(rng), gradient(rng)
    ack = one.push(hub, g1, 11, td=1.0, frames=400)
    assert ack.header["kind"] == "ack" and ack.header["accepted"] and ack.header["version"] == 11
    upstream.room = False  # the client is busy: nothing goes, the next ones are summed
    assert not hub.forward() and upstream.pushed == []
    upstream.fetched = Pulled(np.ones(NUM_PARAMS, np.float32), (14, 16))
    assert hub.take_params() and hub.version == 15
    assert two.push(hub, g2, 15, td=2.0, frames=300).header["accepted"]
    assert one.push(hub, g3, 11, td=4.5, frames=500).header["accepted"]  # older, still fresh
    upstream.room = True
    assert hub.forward()
    (sent,) = upstream.pushed
    np.testing.assert_allclose(sent.grads, (g1 + g2 + g3) / 3, rtol=1e-6, atol=1e-7)
    assert sent.mean_abs_td == pytest.approx((1.0 + 2.0 + 4.5) / 3)
    assert sent.versions == (10, 12)  # per shard, the oldest any of them was computed on
    assert sent.frames == 500 + 300  # each bundle's latest report, summed
    assert not hub.forward()  # nothing waits any more
    assert one.push(hub, g2, 15, frames=600).header["accepted"]
    assert not hub.forward()  # the other active bundle's gradient is waited for...
    hub.timer.now += 2 * aggregator_module.FORWARD_WAIT_SECONDS
    assert hub.forward()  # ...but not for long
    np.testing.assert_array_equal(upstream.pushed[1].grads, g2)  # one gradient: itself
    assert upstream.pushed[1].versions == (14, 16) and upstream.pushed[1].frames == 900
    hub.timer.now += aggregator_module.ACTIVE_SECONDS + 1  # bundle 2 has gone quiet:
    assert one.push(hub, g1, 15, frames=700).header["accepted"]
    assert hub.forward()  # not waited for
    stats = hub.stats()
    assert stats["received"] == {"0": 4, "1": 1} and stats["forwards"] == 3
    assert stats["forwarded_gradients"] == 5 and stats["largest_forward"] == 3


def test_a_bad_push_is_refused_alone_and_bad_requests_get_their_reason():
    rng = np.random.default_rng(1)
    upstream = FakeUpstream(np.zeros(NUM_PARAMS, np.float32), (20,))
    hub = aggregator(upstream, workers=(0,), max_staleness=4)
    one = Bundle(0)
    good = gradient(rng)
    assert one.push(hub, good, 20).header["accepted"]
    broken = good.copy()
    broken[3] = np.nan
    refused = {
        "non_finite": one.push(hub, broken, 20),
        "over_norm": one.push(hub, good * 1000, 20),
        "stale": one.push(hub, good, 21),  # a version it never handed out
    }
    for reason, ack in refused.items():
        assert ack.header["kind"] == "ack" and not ack.header["accepted"], reason
        assert ack.header["reason"] == reason
    upstream.fetched = Pulled(np.zeros(NUM_PARAMS, np.float32), (30,))
    hub.take_params()
    assert one.push(hub, good, 20).header["reason"] == "stale"  # 10 versions old, over 4
    errors = {
        "replayed": one.push(hub, good, 30, seq=one.seq),
        "bad_credential": Bundle(1, credential="0" * 64).push(hub, good, 30),
        "bad_worker": Bundle(1).push(hub, good, 30),  # a bundle of another aggregator
        "no_join": Bundle(0, credentials.join_credential(SECRET)).request(hub, "join"),
    }
    for reason, reply in errors.items():
        assert reply.header["kind"] == "error" and reply.header["reason"] == reason, reason
    assert hub.forward()
    (sent,) = upstream.pushed
    np.testing.assert_array_equal(sent.grads, good)  # only the good push is in the sum
    assert hub.stats()["received"] == {"0": 1}
    assert hub.refused["stale"] == 2 and hub.refused["non_finite"] == 1


def test_hello_and_pulls_are_answered_from_the_params_it_holds():
    flat = np.arange(NUM_PARAMS, dtype=np.float32)
    upstream = FakeUpstream(flat, (7, 9))
    hub = aggregator(upstream)
    two = Bundle(1)
    assert two.push(hub, np.zeros(NUM_PARAMS), 8, frames=1234).header["accepted"]
    welcome = two.request(hub, "hello")
    assert welcome.header["kind"] == "welcome" and welcome.header["version"] == 8
    info = welcome.header["config"]
    assert info["shard_layout"] == [0, NUM_PARAMS] and info["part_size"] == NUM_PARAMS
    assert info["frames"] == 1234  # what it last reported, for a bundle that comes back
    np.testing.assert_array_equal(welcome.arrays[0], flat)
    assert two.request(hub, "pull", version=8).header["kind"] == "not_modified"
    assert upstream.pulls == 1  # every pull asks the shards for newer params
    pulled = two.request(hub, "pull", version=3)
    assert pulled.header["kind"] == "params" and pulled.header["version"] == 8
    assert not hub.all_stopped()
    assert two.request(hub, "stop").header["accepted"]
    assert Bundle(0).request(hub, "stop").header["accepted"] and hub.all_stopped()


# ---- a real aggregator in front of real shards ------------------------------------------


def serve_in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("shards", [1, 2])
def test_an_aggregator_in_front_of_real_shards(shards):
    """Two bundles push the same gradient g through the aggregator to `shards` SGD
    shards: every forward is a mean of copies of g, so each shard's slice moves by
    learning_rate x g once per forward, and its version counts the forwards; the shards
    see one worker, whose frames are the bundles' summed; the bundles' stops end the
    aggregator, whose stop ends the shards."""
    cfg = config(optimizer="sgd", server_shards=shards, learning_rate=0.01)
    params = MLP(num_actions=2, hidden=(8,)).init(jax.random.key(0), np.zeros((1, 4)))
    initial, _ = ravel_pytree(params)
    initial = np.asarray(initial)
    context = zmq.Context.instance()
    servers, threads, sockets, stop = [], [], [], threading.Event()
    for shard in range(shards):
        server = ParameterServer(
            cfg, params, num_workers=1, shard=shard,
            authority=WorkerAuthority(1, secret=SECRET, aggregators=True),
        )  # fmt: skip
        sock, endpoint = transport.make_server_socket(
            context, "tcp://127.0.0.1:0", server.max_bytes
        )
        servers.append((server, endpoint))
        sockets.append(sock)
        threads.append(serve_in_thread(server.serve, sock, endpoint, stop.is_set))
    layout = ShardLayout.even(initial.size, shards)
    fingerprint = servers[0][0].fingerprint
    connections = [
        ServerConnection(
            endpoint,
            credential=credentials.aggregator_credential(SECRET, 0),
            worker=0,
            fingerprint=fingerprint,
            num_params=layout.size(k),
            max_bytes=server.max_bytes,
            timeout_seconds=5.0,
        )
        for k, (server, endpoint) in enumerate(servers)
    ]
    upstream = ShardedClient(
        connections, layout=layout, pieces=[layout.slice(k) for k in range(shards)],
        target_period=cfg.target_period, retry_seconds=10.0,
    )  # fmt: skip
    hub = Aggregator(
        cfg, upstream, workers=(0, 1), authority=WorkerAuthority(2, secret=SECRET),
        fingerprint=fingerprint,
    )  # fmt: skip
    hub_socket, hub_endpoint = transport.make_server_socket(
        context, "tcp://127.0.0.1:0", hub.max_bytes
    )
    hub_thread = serve_in_thread(hub.serve, hub_socket, stop.is_set)
    bundles = [
        ServerConnection(
            hub_endpoint,
            credential=credentials.worker_credential(SECRET, w),
            worker=w,
            fingerprint=fingerprint,
            num_params=initial.size,
            max_bytes=hub.max_bytes,
            timeout_seconds=5.0,
        )
        for w in (0, 1)
    ]
    try:
        g = np.random.default_rng(2).standard_normal(initial.size).astype(np.float32) * 0.1
        for bundle in bundles:
            flat, version, _ = bundle.hello()
            np.testing.assert_array_equal(flat, initial)
        pushes = 40
        for step in range(pushes):
            for bundle in bundles:
                seq = bundle.send_push(g, base_version=version, mean_abs_td=1.0, frames=10 * step)
                accepted, reason, version = bundle.receive_ack(seq)
                assert accepted, reason
        deadline = time.monotonic() + 20
        while (hub.waiting is not None or upstream.accepted < hub.forwards) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        forwards = hub.forwards
        assert hub.forwarded_gradients == 2 * pushes and 1 <= forwards <= 2 * pushes
        for server, _ in servers:
            assert server.version == forwards
            assert server.counters.frames[0] == 2 * 10 * (pushes - 1)
        moved = np.concatenate([np.asarray(server.params) for server, _ in servers])
        np.testing.assert_allclose(moved, initial - cfg.learning_rate * forwards * g, atol=2e-5)
        # A pull through the aggregator brings the shards' params (once it has them).
        deadline = time.monotonic() + 10
        while True:
            pulled, pulled_version = bundles[0].receive_pulled(bundles[0].send_pull(-1))
            if pulled_version == forwards or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert pulled_version == forwards
        np.testing.assert_allclose(pulled, moved, atol=1e-6)
        for bundle in bundles:
            bundle.stop()
        hub_thread.join(timeout=30)
        assert not hub_thread.is_alive()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()  # the aggregator's stop ended every shard
        assert all(0 in server.stopped_workers for server, _ in servers)
    finally:
        stop.set()
        for bundle in bundles:
            bundle.close()
        for thread in [hub_thread, *threads]:
            thread.join(timeout=10)
        for sock in [hub_socket, *sockets]:
            sock.close(linger=0)
