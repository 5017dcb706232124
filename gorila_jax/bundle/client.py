"""A bundle's side of the parameter server: the connection and the remote learner.

`ServerConnection` speaks the wire protocol with one server process (a shard, or the whole
server) over one DEALER socket: every request gets one reply, matched by sequence number, so
several can be in flight. `RemoteLearner` is the bundle's `Updater`: its jitted step
computes the gradient (flattened, cut to the bundle's gradient shard and clipped inside XLA)
and hands it to a communication thread, which pushes every server shard its slice (up to
`PUSHES_IN_FLIGHT` unacknowledged pushes), pulls params from every shard every `sync_every`
learner steps, and refreshes the target network every `target_period` server updates. The
actors wait for the network only when `PUSH_QUEUE` more gradients are queued behind those
in flight. Once that thread runs, it is the only one that touches the sockets, to the final
stop and close.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax.core.config import Config
from gorila_jax.core.gradient_shards import shard_indices
from gorila_jax.core.learner import local_mesh, make_flat_grad_step, shardings
from gorila_jax.core.replay import Sample
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.wire import transport

log = logging.getLogger(__name__)

PUSH_QUEUE = 2
PUSHES_IN_FLIGHT = 2
MAX_REPLY_FRAMES = 2  # a header and at most one array
QUICK_STOP_SECONDS = 2.0  # how long a bundle stopped by a signal waits for the stop's ack
HELLO_AGAIN_SECONDS = 5.0  # how long a hello to a lost server shard may take to be answered


class ServerError(RuntimeError):
    """The server refused a request, or did not answer in time (`lost`: worth a retry)."""

    def __init__(self, message: str, *, lost: bool = False):
        super().__init__(message)
        self.lost = lost


class ServerConnection:
    """Request/reply with the parameter server for one worker.

    Sequence numbers start at the wall clock in nanoseconds, so a restarted bundle numbers
    its requests above everything its earlier life sent (the server refuses any number it
    has seen). The socket lets the server assign its routing id; with `curve` keys it is
    encrypted and speaks only to the server holding that key. One thread at a time
    may use a connection; the tables of pending requests and early replies are guarded all
    the same.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        token: str,
        worker: int,
        fingerprint: str,
        num_params: int,
        max_bytes: int,
        timeout_seconds: float,
        cancel: threading.Event | None = None,
        curve: transport.ClientCurve | None = None,
    ):
        self.token = token
        self.worker = worker
        self.fingerprint = fingerprint
        self.num_params = num_params
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        self.seq = time.time_ns()
        self.cancel = cancel or threading.Event()
        self.endpoint = endpoint
        self.curve = curve
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, float]] = {}
        self._replies: dict[int, transport.Message] = {}
        self._connect()

    def _connect(self) -> None:
        self._socket = transport.make_client_socket(
            zmq.Context.instance(), self.endpoint, None, self.max_bytes, curve=self.curve
        )
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    def reconnect(self) -> None:
        """A fresh socket: requests queued for a dead server are dropped, not replayed."""
        self._socket.close(linger=0)
        with self._lock:
            self._pending.clear()
            self._replies.clear()
        self._connect()

    def _specs(self, header: dict):
        if header["kind"] in ("welcome", "params"):
            return (transport.vector_spec(self.num_params),)
        return None

    def send_request(
        self, kind: str, arrays=(), *, version: int = transport.NO_VERSION, **fields
    ) -> int:
        """Send one request without waiting; returns its sequence number.

        Arrays are sent without copying: keep them unchanged until the reply has arrived.
        """
        self.seq += 1
        header = transport.make_header(
            kind,
            token=self.token,
            worker=self.worker,
            seq=self.seq,
            version=version,
            fingerprint=self.fingerprint,
            **fields,
        )
        transport.send(self._socket, transport.encode(header, arrays), copy=False)
        with self._lock:
            self._pending[self.seq] = (kind, time.monotonic() + self.timeout_seconds)
        return self.seq

    def receive_reply(self, seq: int, *, interruptible: bool = True, wait: bool = True):
        """Wait for the reply to request `seq` (replies to other pending requests are kept);
        with `wait=False`, take what has arrived and return None if that reply has not
        (the request stays pending).

        ServerError on an error reply, on a timeout (`lost`), or when cancelled.
        """
        with self._lock:
            kind, deadline = self._pending[seq]
        settled = False  # answered, refused or given up: no longer pending
        try:
            while not self._has_reply(seq):
                remaining = deadline - time.monotonic()
                if interruptible and self.cancel.is_set():
                    raise ServerError(f"{kind} cancelled: the bundle is stopping")
                if remaining <= 0:
                    raise ServerError(
                        f"no reply to {kind} within {self.timeout_seconds:.0f}s", lost=True
                    )
                if not self._poller.poll(timeout=min(remaining, 0.1) * 1000 if wait else 0):
                    if not wait:
                        return None
                    continue
                try:
                    _, frames = transport.recv(
                        self._socket, max_frames=MAX_REPLY_FRAMES, max_bytes=self.max_bytes
                    )
                    reply = transport.decode_reply(
                        frames,
                        expected_fingerprint=self.fingerprint,
                        layout_for=self._specs,
                        max_bytes=self.max_bytes,
                    )
                except transport.ProtocolError as error:
                    raise ServerError(f"bad reply to {kind}: {error}") from None
                with self._lock:
                    if reply.header["seq"] in self._pending:
                        self._replies[reply.header["seq"]] = reply
                    # else: a late reply to a request given up on; dropped
            with self._lock:
                reply = self._replies.pop(seq)
            settled = True
        except BaseException:
            settled = True
            raise
        finally:
            if settled:
                with self._lock:
                    if seq not in self._replies:
                        self._pending.pop(seq, None)
        if reply.header["kind"] == "error":
            raise ServerError(
                f"server refused {kind}: {reply.header['reason']} ({reply.header['message']})"
            )
        if reply.header["kind"] not in transport.ANSWERS[kind]:
            raise ServerError(f"bad reply to {kind}: a {reply.header['kind']!r} reply")
        return reply

    def _has_reply(self, seq: int) -> bool:
        with self._lock:
            return seq in self._replies

    def request(
        self,
        kind: str,
        arrays=(),
        *,
        version: int = transport.NO_VERSION,
        interruptible: bool = True,
        **fields,
    ):
        """Send one request and wait for its reply; ServerError on an error reply or timeout.

        An interruptible request gives up as soon as `cancel` is set (the bundle is stopping).
        """
        seq = self.send_request(kind, arrays, version=version, **fields)
        return self.receive_reply(seq, interruptible=interruptible)

    def hello(self) -> tuple[np.ndarray, int, dict]:
        """Register; returns (flat params, version, the server's info for this worker)."""
        reply = self.request("hello")
        return reply.arrays[0], reply.header["version"], reply.header["config"]

    def pull(self, have_version: int) -> tuple[np.ndarray | None, int]:
        """Params newer than `have_version` (None if not modified) and the server's version."""
        return self.receive_pulled(self.send_pull(have_version))

    def send_pull(self, have_version: int) -> int:
        """Ask for params newer than `have_version` without waiting; returns the seq."""
        return self.send_request("pull", version=have_version)

    def receive_pulled(self, seq: int) -> tuple[np.ndarray | None, int]:
        """The reply to the pull `seq`: (params, or None if not modified; server version)."""
        reply = self.receive_reply(seq)
        params = reply.arrays[0] if reply.header["kind"] == "params" else None
        return params, reply.header["version"]

    def send_push(
        self, grads: np.ndarray, *, base_version: int, loss: float, frames: int, shard: int | None
    ) -> int:
        """Send a gradient without waiting for its acknowledgement; returns its seq."""
        return self.send_request(
            "push", [grads], version=base_version, loss=float(loss), shard=shard, frames=frames
        )

    def receive_ack(self, seq: int) -> tuple[bool, str | None, int]:
        """(accepted, reason if not, server version) of the push `seq`."""
        reply = self.receive_reply(seq)
        return reply.header["accepted"], reply.header["reason"], reply.header["version"]

    def push(
        self, grads: np.ndarray, *, base_version: int, loss: float, frames: int, shard: int | None
    ) -> tuple[bool, str | None, int]:
        """Push a gradient and wait; returns (accepted, reason if not, server version)."""
        seq = self.send_push(
            grads, base_version=base_version, loss=loss, frames=frames, shard=shard
        )
        return self.receive_ack(seq)

    def stats(self) -> dict:
        """The server's statistics."""
        return self.request("stats").header["stats"]

    def stop(self) -> None:
        """Tell the server this worker is done (even while the bundle is being stopped)."""
        self.request("stop", interruptible=False)

    def close(self) -> None:
        """Close the socket."""
        self._socket.close(linger=0)


class _Lost(NamedTuple):
    """A server shard this bundle has lost: when it gives up, when it next says hello, the
    backoff after that, and the hello waiting for an answer (its seq)."""

    deadline: float
    next_attempt: float
    delay: float
    hello: int | None = None


@jax.jit
def _add(total, grads):
    return jax.tree.map(jnp.add, total, grads)


@jax.jit
def _scale(total, factor):
    return jax.tree.map(lambda x: x * factor, total)


class RemoteLearner:
    """The Updater of a Gorila bundle: gradients go to the server, params come back.

    The server may be split into S shards (`gorila_jax.core.shard_layout`), one connection each:
    a push sends every shard its slice of the gradient (all in flight at once, then the
    acknowledgements are collected), a pull gathers every slice. The bundle keeps the
    version of each shard's slice it holds, and each shard judges staleness on its own.
    The target network is refreshed every `target_period` server updates, counted as the
    mean of the shards' versions (with one shard, the server's version). A shard that stops
    answering is said hello to again, with backoff, for up to `server_retry_seconds`, while
    pushes and pulls go on with the others; a shard that refuses a push does not undo the
    others' updates (as in the paper).
    """

    def __init__(
        self,
        config: Config,
        network,
        params_template: Any,
        connections: list[ServerConnection],
        *,
        num_workers: int,
        stop_event: threading.Event | None = None,
    ):
        self.config = config
        self.connections = list(connections)
        self.worker = self.connections[0].worker
        self._stop = stop_event or threading.Event()
        flat_template, self._unravel = ravel_pytree(params_template)
        self.layout = ShardLayout.even(int(flat_template.size), len(self.connections))
        mesh = local_mesh()
        self._where = shardings(mesh)
        owned = shard_indices(
            self.layout.num_params, num_workers, self.worker, config.shard_factor, config.seed
        )
        self._shard = None if owned is None else self.worker
        # Per server shard: the positions of the pushed vector it gets (None: nothing).
        if owned is None:
            self._pieces: list[slice | None] = [
                self.layout.slice(k) for k in range(self.layout.num_shards)
            ]
        else:
            self._pieces = [
                positions if positions.stop > positions.start else None
                for positions, _ in self.layout.split_indices(owned)
            ]
        slices, versions, frames = [], [], []
        try:
            for shard, connection in enumerate(self.connections):
                flat, version, info = connection.hello()
                self._check_welcome(shard, info)
                slices.append(flat)
                versions.append(version)
                frames.append(info.get("frames", 0))  # checked by _check_welcome
        except BaseException:  # no learner to close later: close the sockets now
            for connection in self.connections:
                connection.close()
            raise
        self.start_frames = max(frames)
        self.reconnects = 0
        self._grad_step = make_flat_grad_step(
            network,
            double_dqn=config.double_dqn,
            huber_delta=config.huber_delta,
            mesh=mesh,
            owned=owned,
            max_grad_norm=config.max_grad_norm or None,
        )
        # The communication thread's copy of the params (host, flat) and of each slice's
        # version; the main thread's are `params` / `params_versions`, handed over whole.
        self._host = self.layout.join(slices)
        self._host_versions = list(versions)
        self.params = self._to_device(self._host)
        self.target_params = self.params
        self.params_versions = tuple(versions)
        self.server_versions = list(versions)
        self._target_epoch = self.server_version // config.target_period
        self.updates = 0
        self.frames = 0
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self._lost: dict[int, _Lost] = {}
        self._outbox: queue.Queue = queue.Queue(maxsize=PUSH_QUEUE)
        # push_every > 1: (sum of gradients, sum of mean |TD|, oldest versions, count).
        self._pending: tuple[Any, Any, tuple[int, ...], int] | None = None
        self._in_flight: list[dict[int, int]] = []  # per push: shard -> seq of its slice
        self._sent: list[list] = []  # the arrays those frames are sent from, kept alive
        self._pull_wanted = threading.Event()
        # Params pulled by the communication thread, waiting for the main thread: the newest
        # (params, versions), and the params of a target refresh, kept apart so a later
        # pull cannot overwrite a refresh before it is taken.
        self._incoming_lock = threading.Lock()
        self._incoming: tuple[Any, tuple[int, ...]] | None = None
        self._incoming_target: Any | None = None
        self._closing = threading.Event()
        self._quick = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._communicate, name="ps-client", daemon=True)
        self._thread.start()

    def _check_welcome(self, shard: int, info: dict) -> None:
        """The server shard at this connection holds the slice this bundle expects."""
        layout = info.get("shard_layout", [0, self.layout.num_params])
        if info.get("server_shard", 0) != shard or layout != list(self.layout.bounds):
            raise ServerError(
                f"server shard {shard} answered as shard {info.get('server_shard', 0)} of "
                f"layout {layout}, expected {list(self.layout.bounds)}; same config?"
            )
        piece = self._pieces[shard]
        expected = 0 if piece is None else piece.stop - piece.start
        if self._shard is None:
            expected = self.layout.size(shard)
        if info.get("shard_size") != expected:
            raise ServerError(
                "the server's gradient shard differs from this bundle's; same config?"
            )
        frames = info.get("frames", 0)
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
            raise ServerError(f"bad welcome from server shard {shard}: frames {frames!r}")

    @property
    def server_version(self) -> int:
        """Server updates: the mean of the shards' versions (the only version of one)."""
        return sum(self.server_versions) // len(self.server_versions)

    @property
    def params_version(self) -> int:
        """The server updates the acting params stem from (the mean over their slices)."""
        return sum(self.params_versions) // len(self.params_versions)

    def _to_device(self, flat: np.ndarray) -> Any:
        return jax.device_put(self._unravel(jnp.asarray(flat)), self._where.replicated)

    def _deliver(self, params: Any, versions: tuple[int, ...], *, refresh_target: bool) -> None:
        """Hand pulled params to the main thread (called by the communication thread)."""
        with self._incoming_lock:
            self._incoming = (params, versions)
            if refresh_target:
                self._incoming_target = params

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            incoming, self._incoming = self._incoming, None
            target, self._incoming_target = self._incoming_target, None
        if incoming is not None:
            self.params, self.params_versions = incoming
        if target is not None:
            self.target_params = target

    def acting_params(self) -> Any:
        """The newest params pulled from the server."""
        self._take_incoming()
        return self.params

    def learn(self, sample: Sample, frames: int = 0):
        """Compute this bundle's gradient and queue it for pushing."""
        self._take_incoming()
        self.frames = frames
        batch = jax.device_put(sample.transition, self._where.batch)
        weights = jax.device_put(sample.weights, self._where.batch)
        grads, metrics = self._grad_step(self.params, self.target_params, batch, weights)
        self._accumulate(grads, metrics.mean_abs_td)
        self.updates += 1
        if self.updates % self.config.sync_every == 0:
            self._pull_wanted.set()
        return metrics

    def _accumulate(self, grads, mean_abs_td) -> None:
        """Add a gradient to the ones waiting for the next push; queue their mean once
        `push_every` have come. The mean of clipped gradients stays within the clip (the
        server refuses anything over it); it is pushed with the params versions of the
        oldest gradient in it, so the server judges its staleness by its stalest part."""
        if self._pending is None:
            self._pending = (grads, mean_abs_td, self.params_versions, 1)
        else:
            total, td, versions, count = self._pending
            self._pending = (_add(total, grads), td + mean_abs_td, versions, count + 1)
        if self._pending[3] >= self.config.push_every:
            self._queue_pending()

    def _queue_pending(self) -> None:
        """Queue the waiting gradients' mean for the communication thread (it blocks while
        the queue is full, until the run stops)."""
        if self._pending is None:
            return
        total, td, versions, count = self._pending
        self._pending = None
        item = (total if count == 1 else _scale(total, 1.0 / count), td / count, versions)
        while not self._closing.is_set() and self.error is None:
            if self._stop.is_set():  # a signal: abandon in-flight requests, stop soon
                for connection in self.connections:
                    connection.cancel.set()
                break
            try:
                self._outbox.put(item, timeout=0.1)
                break
            except queue.Full:
                continue

    def should_stop(self) -> bool:
        """Stop when the communication thread has failed or a signal arrived."""
        return self.error is not None or self._stop.is_set()

    def _communicate(self) -> None:
        try:
            while True:
                if self._lost and not self._quick:
                    self._say_hello_again()
                drained = (
                    self._closing.is_set() and self._outbox.empty() and not any(self._in_flight)
                )
                # A normal close waits for lost shards to come back (or for their deadline,
                # an error), so that every shard hears this bundle's stop.
                if drained and (self._quick or not self._lost):
                    break
                if drained or len(self._lost) == len(self.connections):
                    time.sleep(0.05)  # nothing to talk to yet
                    continue
                self._exchange()
        except BaseException as error:  # surfaced to the main thread through should_stop
            self.error = error
        finally:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        """Tell every shard this bundle is done, then close the sockets: in this thread,
        the only one that uses them once it runs.

        Stopped by a signal (`close(quick=True)`), wait only a moment for the server, which
        is stopping too; after an error, the server is gone or refused: just close.
        """
        for shard, connection in enumerate(self.connections):
            try:
                if self._quick:
                    connection.timeout_seconds = min(connection.timeout_seconds, QUICK_STOP_SECONDS)
                    with contextlib.suppress(ServerError):
                        connection.stop()
                elif self.error is None and shard not in self._lost:
                    connection.stop()
            except BaseException as error:  # the other shards still get their stop
                self.error = self.error or error
        for connection in self.connections:
            connection.close()

    def _call(self, shard: int, method, *args, **kwargs):
        """`method(*args, **kwargs)` of a shard's connection; a lost reply marks the shard
        lost (None is returned; closing or not, it is said hello again until its deadline),
        any other refusal is raised."""
        try:
            return method(*args, **kwargs)
        except ServerError as error:
            if not error.lost:
                raise
            self._lose(shard, error)
            return None

    def _split(self, grads: np.ndarray) -> list[np.ndarray | None]:
        """The pushed vector cut into each shard's piece (views; None: nothing there)."""
        return [None if piece is None else grads[piece] for piece in self._pieces]

    def _exchange(self) -> None:
        """Send queued gradients (up to PUSHES_IN_FLIGHT unacknowledged), collect the oldest
        acknowledgements, and pull when due. Keeping a second push in flight lets the server
        apply one gradient while the next one crosses the network."""
        while len(self._in_flight) < PUSHES_IN_FLIGHT:
            try:
                grads, loss, base_versions = self._outbox.get(
                    timeout=0.0 if self._in_flight else 0.05
                )
            except queue.Empty:
                break
            pieces, loss = self._split(np.asarray(grads)), float(loss)
            sent: dict[int, int] = {}
            for shard, piece in enumerate(pieces):
                if piece is None or shard in self._lost:
                    continue
                sent[shard] = self.connections[shard].send_push(
                    piece, base_version=base_versions[shard], loss=loss,
                    frames=self.frames, shard=self._shard,
                )  # fmt: skip
            self._in_flight.append(sent)
            self._sent.append(pieces)  # the frames are sent from these arrays
        if self._in_flight:
            sent = self._in_flight[0]
            results = {}
            for shard, seq in list(sent.items()):  # a lost shard leaves `sent`
                if shard in self._lost:
                    continue
                ack = self._call(shard, self.connections[shard].receive_ack, seq)
                if ack is not None:
                    accepted, reason, version = ack
                    self.server_versions[shard] = max(self.server_versions[shard], version)
                    results[shard] = (accepted, reason)
            self._in_flight.pop(0)
            self._sent.pop(0)
            if results and all(accepted for accepted, _ in results.values()):
                self.accepted += 1
            for reason in {reason for accepted, reason in results.values() if not accepted}:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
        refresh = self.server_version // self.config.target_period > self._target_epoch
        if refresh or self._pull_wanted.is_set():
            self._pull_wanted.clear()
            self._pull(refresh)

    def _pull(self, refresh_target: bool) -> None:
        """Ask every shard for its newer slice at once, then gather the replies."""
        asked = {
            shard: self.connections[shard].send_pull(
                -1 if refresh_target else self._host_versions[shard]
            )
            for shard in range(len(self.connections))
            if shard not in self._lost
        }
        fresh: dict[int, np.ndarray] = {}
        for shard, seq in asked.items():
            if shard in self._lost:
                continue
            reply = self._call(shard, self.connections[shard].receive_pulled, seq)
            if reply is None:
                continue
            flat, version = reply
            self.server_versions[shard] = version
            if flat is not None:
                fresh[shard] = flat
                self._host_versions[shard] = version
        if fresh:
            host = self._host = self._with_slices(fresh)
            if refresh_target:
                self._target_epoch = self.server_version // self.config.target_period
            self._deliver(
                self._to_device(host), tuple(self._host_versions), refresh_target=refresh_target
            )

    def _with_slices(self, fresh: dict[int, np.ndarray]) -> np.ndarray:
        """A new host vector: the `fresh` slices (by shard) and the current ones elsewhere.
        Never written in place, since the old vector may still be in use; one copy at most,
        none with one shard."""
        slices = self.layout.split(self._host)
        for shard, flat in fresh.items():
            slices[shard] = flat
        return slices[0] if len(slices) == 1 else self.layout.join(slices)

    def _lose(self, shard: int, error: ServerError) -> None:
        """Mark a shard lost: its pending acknowledgements died with the connection."""
        retry = self.config.server_retry_seconds
        now = time.monotonic()
        self._lost[shard] = _Lost(now + retry, now, 0.5)
        for sent in self._in_flight:
            sent.pop(shard, None)
        log.warning(
            f"lost {self._shard_name(shard)} ({error}); reconnecting for up to {retry:.0f}s"
        )

    def _shard_name(self, shard: int) -> str:
        return "the server" if len(self.connections) == 1 else f"server shard {shard}"

    def _say_hello_again(self) -> None:
        """Say hello again to every lost shard whose backoff has passed, without waiting
        for the answer (the others are being pushed to meanwhile); take the answers that
        have come. A shard past its deadline ends the bundle (ServerError)."""
        for shard, lost in list(self._lost.items()):
            connection = self.connections[shard]
            if lost.hello is None:
                if time.monotonic() < lost.next_attempt:
                    continue
                connection.reconnect()
                timeout = connection.timeout_seconds
                connection.timeout_seconds = min(timeout, HELLO_AGAIN_SECONDS)
                try:
                    self._lost[shard] = lost._replace(hello=connection.send_request("hello"))
                finally:
                    connection.timeout_seconds = timeout
                continue
            try:
                reply = connection.receive_reply(lost.hello, wait=False)
            except ServerError as attempt:
                if not attempt.lost or time.monotonic() + lost.delay > lost.deadline:
                    raise ServerError(
                        f"{self._shard_name(shard)} did not come back within "
                        f"{self.config.server_retry_seconds:.0f}s ({attempt})"
                    ) from None
                self._lost[shard] = lost._replace(
                    hello=None,
                    next_attempt=time.monotonic() + lost.delay,
                    delay=min(2 * lost.delay, 10.0),
                )
                continue
            if reply is None:
                continue
            flat, version, info = reply.arrays[0], reply.header["version"], reply.header["config"]
            self._check_welcome(shard, info)
            del self._lost[shard]
            self.server_versions[shard] = version
            host = self._host = self._with_slices({shard: flat})
            self._host_versions[shard] = version
            self._target_epoch = self.server_version // self.config.target_period
            self._deliver(self._to_device(host), tuple(self._host_versions), refresh_target=True)
            self.reconnects += 1
            log.info(f"reconnected to {self._shard_name(shard)} at version {version}")

    def close(self, *, quick: bool = False) -> None:
        """Push what is queued, tell the server this bundle is done, close the sockets (all
        done by the communication thread; this waits for it).

        `quick` (the run is being stopped by a signal): drop what is queued and give the
        server only a moment to acknowledge, since it is stopping too.
        """
        self._quick = quick
        if not quick:  # push_every > 1: the gradients waiting for a push are not lost
            self._queue_pending()
        self._closing.set()
        if quick:
            for connection in self.connections:
                connection.cancel.set()
        timeout, shards = self.config.server_timeout_seconds, len(self.connections)
        # Not quick: the queued and in-flight pushes and two pulls, a lost shard's whole
        # retry window and its last hello, then one stop per shard, each within the timeout.
        requests = PUSH_QUEUE + PUSHES_IN_FLIGHT + 2 + shards
        waits = (
            (QUICK_STOP_SECONDS + 1) * shards
            if quick
            else requests * timeout + self.config.server_retry_seconds + HELLO_AGAIN_SECONDS + 5
        )
        self._thread.join(timeout=waits)
        if self._thread.is_alive() and self.error is None:
            self.error = ServerError(f"the communication thread did not finish in {waits:.0f}s")
        if self.error is not None and not quick:
            raise ServerError(f"bundle lost the server: {self.error}") from self.error
