"""The server against peers and disks that misbehave (issue 20): a peer that asks and never
reads cannot make it hoard replies; a full disk is not retried every serve turn; a
gradient over the bundles' clip is refused from outside, over the socket; a peer of
another wire protocol is told so and changes nothing."""

import dataclasses
import errno
import itertools
import threading
import time

import jax
import msgpack
import numpy as np
import zmq

from gorila_jax.bundle.client import ServerConnection
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

SECRET = credentials.new_run_secret()


def credential(worker: int) -> str:
    return credentials.worker_credential(SECRET, worker)


def push_and_wait(connection: ServerConnection, grads, **fields) -> tuple:
    """(accepted, reason, version) of one push, as the bundle's client sends it."""
    return connection.receive_ack(connection.send_push(grads, **fields))


def pull_and_wait(connection: ServerConnection, have_version: int) -> tuple:
    """(params or None, version) of one pull, as the bundle's client sends it."""
    return connection.receive_pulled(connection.send_pull(have_version))


class Served:
    """A ParameterServer serving on loopback in a thread, stopped on exit."""

    def __init__(self, params, *, num_workers: int = 2, checkpointer=None, **overrides):
        config = dataclasses.replace(cartpole_defaults(), **overrides)
        self.server = ParameterServer(
            config,
            params,
            num_workers=num_workers,
            authority=WorkerAuthority(num_workers, secret=SECRET),
        )
        self.socket, self.endpoint = transport.make_server_socket(
            zmq.Context.instance(), "tcp://127.0.0.1:0", self.server.max_bytes
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.server.serve,
            args=(self.socket, self.endpoint, self.stop.is_set),
            kwargs={"checkpointer": checkpointer},
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        self.socket.close(linger=0)

    def raw_reply(self, header_frame: bytes, *frames: bytes) -> dict:
        """Send one message of `header_frame` (and `frames`) from a bare DEALER (no client
        checks) and return the header of the server's reply."""
        peer = zmq.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(self.endpoint)
        try:
            peer.send_multipart([header_frame, *frames])
            assert peer.poll(10_000), "no reply"
            return msgpack.unpackb(peer.recv_multipart()[0])
        finally:
            peer.close(linger=0)

    def connection(self, worker: int) -> ServerConnection:
        return ServerConnection(
            self.endpoint, credential=credential(worker), worker=worker,
            fingerprint=self.server.fingerprint,
            num_params=self.server.num_params, max_bytes=self.server.max_bytes,
            timeout_seconds=10.0,
        )  # fmt: skip


def test_a_peer_that_pulls_and_never_reads_gets_its_replies_dropped_not_hoarded():
    """Catches an unbounded send queue: a credential holder that sends pulls and never reads
    made the server hold 150 params replies (630 MB for a 4 MB model). Here 80 pulls for
    4 MB params: about `SERVER_SEND_QUEUE` (32) wait for it, plus what the kernel buffers;
    the rest are dropped and counted, and a well-behaved bundle is still answered."""
    params = {"w": np.zeros(1_000_000, np.float32)}  # 4 MB replies
    with Served(params) as served:
        greedy = zmq.Context.instance().socket(zmq.DEALER)
        greedy.setsockopt(zmq.RCVHWM, 1)
        greedy.setsockopt(zmq.RCVBUF, 4096)
        greedy.setsockopt(zmq.LINGER, 0)
        greedy.connect(served.endpoint)
        try:
            for seq in range(1, 81):
                header = transport.make_header(
                    "pull", credential=credential(1), worker=1, seq=seq, version=-1,
                    fingerprint=served.server.fingerprint,
                )  # fmt: skip
                transport.send(greedy, transport.encode(header))
            events = served.server.counters.events
            deadline = time.monotonic() + 20
            while events["reply_dropped_queue_full"] < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert events["reply_dropped_queue_full"] >= 40
            good = served.connection(0)
            try:
                flat, version, _ = good.hello()
                assert version == 0 and flat.shape == (1_000_000,)
            finally:
                good.close()
        finally:
            greedy.close(linger=0)


class FullDisk:
    """A checkpointer whose every save fails as a full disk does."""

    def __init__(self):
        self.attempts: list[float] = []

    def save(self, version, state, meta, *, replace=False):
        self.attempts.append(time.monotonic())
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_checkpoint_is_retried_with_backoff_not_every_turn():
    """Catches a server that retries a failed checkpoint every serve turn: on a full disk
    an idle server made 30 full attempts (and 30 warnings) in 3 s. Here a stop makes a
    checkpoint due at once and the disk stays full for 3.5 s: tries at 0, 1 and 3 s, then
    the last one at the end."""
    params = jax.tree.map(np.asarray, {"w": np.zeros(16, np.float32)})
    disk = FullDisk()
    with Served(params, checkpointer=disk) as served:
        bundle = served.connection(0)
        try:
            bundle.hello()
            bundle.stop()  # worker 0 is done: the state changed, a checkpoint is due
            time.sleep(3.5)
        finally:
            bundle.close()
    attempts = [t - disk.attempts[0] for t in disk.attempts]
    assert 3 <= len(attempts) <= 5, attempts  # 0, ~1, ~3 s and the final save
    tries = attempts[:-1]  # the final save comes when the server stops, whenever that is
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(tries))
    assert served.server.checkpointed_version == -1  # never claims a checkpoint it lacks


def test_a_gradient_over_the_clip_is_refused_over_the_socket_and_adam_goes_on():
    """Catches a server that applies any finite gradient (issue 20, item 3, from outside):
    one push of 1e18 per element poisoned Adam's second moments, and the next 2,000
    normal pushes moved the params by 0. It is refused as over_norm; the normal pushes
    after it keep moving the params by about the learning rate."""
    params = {"w": np.zeros(64, np.float32)}
    with Served(params, optimizer="adam", learning_rate=1e-3, max_grad_norm=10.0) as served:
        bundle = served.connection(0)
        try:
            flat, version, _ = bundle.hello()
            huge = np.full(64, 1e18, np.float32)
            refused = push_and_wait(bundle, huge, base_version=version, mean_abs_td=0.5, frames=4)
            assert refused[:2] == (False, "over_norm")
            normal = np.full(64, 0.1, np.float32)
            for step in range(20):
                accepted, _, version = push_and_wait(
                    bundle, normal, base_version=version, mean_abs_td=0.5, frames=8 + step
                )
                assert accepted
            moved, _ = pull_and_wait(bundle, -1)
            step_sizes = np.abs(moved - flat) / 20
            assert np.all(step_sizes > 0.5e-3)  # Adam's step ~ the learning rate
            assert served.server.stats()["rejections"] == {"over_norm": 1}
        finally:
            bundle.close()


def test_a_seq_far_ahead_of_the_clock_and_an_implausible_frame_count_are_refused():
    """Catches the lock-out and the budget attack of issue 20, item 4: with the run token
    a peer sent a request as worker 1 with seq 2^64-1, after which worker 1's real hello
    was refused as replayed (for good: last_seq is checkpointed); and it pushed frames
    2^60, which the server stored and handed back in the welcome, so a restarted bundle
    started past its budget. Both are refused now and the real bundle is unharmed. (Worker
    1's own credential: with another's, both are refused earlier, as bad_credential.)"""
    params = {"w": np.zeros(64, np.float32)}
    with Served(params) as served:
        header = transport.make_header(
            "pull", credential=credential(1), worker=1, seq=2**64 - 1, version=-1,
            fingerprint=served.server.fingerprint,
        )  # fmt: skip
        reply = served.raw_reply(transport.encode(header)[0])
        assert (reply["kind"], reply["reason"]) == ("error", "future_seq")
        bundle = served.connection(1)
        try:
            _, version, info = bundle.hello()  # not locked out
            assert info["frames"] == 0
            grads = np.full(64, 0.01, np.float32)
            refused = push_and_wait(
                bundle, grads, base_version=version, mean_abs_td=0.5, frames=2**60
            )
            assert refused[:2] == (False, "implausible_frames")
            accepted = push_and_wait(
                bundle, grads, base_version=version, mean_abs_td=0.5, frames=4000
            )
            assert accepted[0]
        finally:
            bundle.close()
        assert served.server.counters.frames[1] == 4000


def test_a_header_whose_kind_is_a_map_is_malformed_not_a_crash():
    """Catches a lookup of an unhashable kind (a msgpack map) in the kind tables: it raised
    TypeError out of the serve loop, so one request with a credential ended the server."""
    params = {"w": np.zeros(16, np.float32)}
    with Served(params) as served:
        header = {
            "kind": {"push": 1}, "credential": credential(0), "worker": 0, "seq": 1, "version": 0,
            "fingerprint": served.server.fingerprint, "protocol": transport.PROTOCOL_VERSION,
            "arrays": 0,
        }  # fmt: skip
        reply = served.raw_reply(msgpack.packb(header))
        assert (reply["kind"], reply["reason"]) == ("error", "malformed")
        bundle = served.connection(0)
        try:
            assert bundle.hello()[1] == 0  # still serving
        finally:
            bundle.close()
    assert served.server.stats()["rejections"] == {"malformed": 1}


def protocol_2_request(kind: str, *, worker: int, seq: int, fingerprint: str) -> dict:
    """A request header as a bundle of protocol 2 wrote it: the run token, a push's loss
    and gradient shard, the stats request."""
    header = {
        "kind": kind, "protocol": 2, "token": "t" * 64, "worker": worker, "seq": seq,
        "version": 0, "fingerprint": fingerprint, "arrays": 0,
    }  # fmt: skip
    if kind == "push":
        header |= {"loss": 0.5, "shard": None, "frames": 100, "arrays": 1}
    return header


def test_a_protocol_2_request_gets_bad_protocol_naming_both_versions_and_changes_nothing():
    """Catches a server that answers an older bundle with a confusing error (its token or
    its loss field "malformed", its stats kind unknown) or lets it move anything: every
    request of protocol 2 gets an error reply "bad_protocol" that names both versions, in
    this protocol, addressed to the request's worker and seq, counted as unauthenticated;
    a stop does not stop the worker it names, a huge seq does not lock it out, and the
    bundle of this protocol goes on."""
    params = {"w": np.zeros(16, np.float32)}
    with Served(params) as served:
        server = served.server
        bundle = served.connection(0)
        try:
            _, version, _ = bundle.hello()
            workers_before, last_seq = server.stats()["workers"], dict(server.last_seq)
            vector = np.full(16, 0.5, np.float32).tobytes()
            sent = [(1, "hello"), (2, "pull"), (3, "push"), (4, "stats"), (2**63, "stop")]
            for seq, kind in sent:
                header = protocol_2_request(kind, worker=0, seq=seq, fingerprint=server.fingerprint)
                frames = [vector] if kind == "push" else []
                reply = served.raw_reply(msgpack.packb(header), *frames)
                assert reply["kind"] == "error" and reply["reason"] == "bad_protocol", reply
                assert reply["message"] == "protocol 2, expected 4"
                assert reply["protocol"] == transport.PROTOCOL_VERSION == 4
                assert (reply["worker"], reply["seq"]) == (0, seq)
                assert "credential" not in reply and "token" not in reply
            stats = server.stats()
            assert stats["rejections"] == {"bad_protocol": 5}
            assert stats["unauthenticated"] == {"rejected": 5}
            assert stats["workers"] == workers_before
            assert server.last_seq == last_seq and not server.stopped_workers
            grads = np.full(16, 0.01, np.float32)
            accepted = push_and_wait(bundle, grads, base_version=version, mean_abs_td=0.5, frames=4)
            assert accepted == (True, None, version + 1)
        finally:
            bundle.close()
