"""The server against peers and disks that misbehave (issue 20): a peer that asks and never
reads cannot make it hoard replies; a full disk is not retried every serve turn; a
gradient over the bundles' clip is refused from outside, over the socket."""

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
from gorila_jax.wire import transport

TOKEN = "t" * 64


class Served:
    """A ParameterServer serving on loopback in a thread, stopped on exit."""

    def __init__(self, params, *, num_workers: int = 2, checkpointer=None, **overrides):
        config = dataclasses.replace(cartpole_defaults(), **overrides)
        self.server = ParameterServer(config, params, num_workers=num_workers, token=TOKEN)
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

    def raw_reply(self, header_frame: bytes) -> dict:
        """Send one message of `header_frame` from a bare DEALER (no client checks) and
        return the header of the server's reply."""
        peer = zmq.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(self.endpoint)
        try:
            peer.send(header_frame)
            assert peer.poll(10_000), "no reply"
            return msgpack.unpackb(peer.recv_multipart()[0])
        finally:
            peer.close(linger=0)

    def connection(self, worker: int) -> ServerConnection:
        return ServerConnection(
            self.endpoint, token=TOKEN, worker=worker, fingerprint=self.server.fingerprint,
            num_params=self.server.num_params, max_bytes=self.server.max_bytes,
            timeout_seconds=10.0,
        )  # fmt: skip


def test_a_peer_that_pulls_and_never_reads_gets_its_replies_dropped_not_hoarded():
    """Catches an unbounded send queue: a token holder that sends pulls and never reads
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
                    "pull", token=TOKEN, worker=1, seq=seq, version=-1,
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
            assert bundle.push(huge, base_version=version, loss=0.5, frames=4, shard=None)[:2] == (
                False,
                "over_norm",
            )
            normal = np.full(64, 0.1, np.float32)
            for step in range(20):
                accepted, _, version = bundle.push(
                    normal, base_version=version, loss=0.5, frames=8 + step, shard=None
                )
                assert accepted
            moved, _ = bundle.pull(-1)
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
    started past its budget. Both are refused now and the real bundle is unharmed."""
    params = {"w": np.zeros(64, np.float32)}
    with Served(params) as served:
        header = transport.make_header(
            "pull", token=TOKEN, worker=1, seq=2**64 - 1, version=-1,
            fingerprint=served.server.fingerprint,
        )  # fmt: skip
        reply = served.raw_reply(transport.encode(header)[0])
        assert (reply["kind"], reply["reason"]) == ("error", "future_seq")
        bundle = served.connection(1)
        try:
            _, version, info = bundle.hello()  # not locked out
            assert info["frames"] == 0
            grads = np.full(64, 0.01, np.float32)
            refused = bundle.push(grads, base_version=version, loss=0.5, frames=2**60, shard=None)
            assert refused[:2] == (False, "implausible_frames")
            accepted = bundle.push(grads, base_version=version, loss=0.5, frames=4000, shard=None)
            assert accepted[0]
        finally:
            bundle.close()
        assert served.server.counters.frames[1] == 4000


def test_a_header_whose_kind_is_a_map_is_malformed_not_a_crash():
    """Catches a lookup of an unhashable kind (a msgpack map) in the kind tables: it raised
    TypeError out of the serve loop, so one request with the token ended the server."""
    params = {"w": np.zeros(16, np.float32)}
    with Served(params) as served:
        header = {
            "kind": {"push": 1}, "token": TOKEN, "worker": 0, "seq": 1, "version": 0,
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
