"""A bundle's side of the parameter server: the connection and the remote learner.

`ServerConnection` speaks the wire protocol over one DEALER socket (every request gets one
reply, matched by sequence number, so several can be in flight). `RemoteLearner` is the
bundle's `Updater`: its jitted step computes the gradient (flattened, and cut to the bundle's
shard inside XLA) and hands it to a communication thread, which pushes it (up to
`PUSHES_IN_FLIGHT` unacknowledged), pulls params every `sync_every` learner steps, and
refreshes the target network every `target_period` server updates. The actors wait for the
network only when `PUSH_QUEUE` more gradients are queued behind those in flight. Once that
thread runs, it is the only one that touches the socket, to the final stop and close.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax import transport
from gorila_jax.config import Config
from gorila_jax.gradient_shards import shard_indices
from gorila_jax.learner import local_mesh, make_flat_grad_step, shardings
from gorila_jax.replay import Sample

PUSH_QUEUE = 2
PUSHES_IN_FLIGHT = 2
MAX_REPLY_FRAMES = 2  # a header and at most one array
QUICK_STOP_SECONDS = 2.0  # how long a bundle stopped by a signal waits for the stop's ack


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

    def receive_reply(self, seq: int, *, interruptible: bool = True):
        """Wait for the reply to request `seq` (replies to other pending requests are kept).

        ServerError on an error reply, on a timeout (`lost`), or when cancelled.
        """
        with self._lock:
            kind, deadline = self._pending[seq]
        try:
            while not self._has_reply(seq):
                remaining = deadline - time.monotonic()
                if interruptible and self.cancel.is_set():
                    raise ServerError(f"{kind} cancelled: the bundle is stopping")
                if remaining <= 0:
                    raise ServerError(
                        f"no reply to {kind} within {self.timeout_seconds:.0f}s", lost=True
                    )
                if not self._poller.poll(timeout=min(remaining, 0.1) * 1000):
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
        finally:
            with self._lock:
                if seq not in self._replies:
                    self._pending.pop(seq, None)
        if reply.header["kind"] == "error":
            raise ServerError(
                f"server refused {kind}: {reply.header['reason']} ({reply.header['message']})"
            )
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
        reply = self.request("pull", version=have_version)
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


class RemoteLearner:
    """The Updater of a Gorila bundle: gradients go to the server, params come back."""

    def __init__(
        self,
        config: Config,
        network,
        params_template: Any,
        connection: ServerConnection,
        *,
        num_workers: int,
        stop_event: threading.Event | None = None,
    ):
        self.config = config
        self.connection = connection
        self._stop = stop_event or threading.Event()
        _, self._unravel = ravel_pytree(params_template)
        mesh = local_mesh()
        self._where = shardings(mesh)
        flat, version, info = connection.hello()
        self._indices = shard_indices(
            connection.num_params, num_workers, connection.worker, config.shard_factor, config.seed
        )
        self._shard = None if self._indices is None else connection.worker
        self.start_frames = int(info.get("frames", 0))
        self.reconnects = 0
        if info["shard_size"] != (
            connection.num_params if self._indices is None else len(self._indices)
        ):
            raise ServerError(
                "the server's gradient shard differs from this bundle's; same config?"
            )
        self._grad_step = make_flat_grad_step(
            network,
            double_dqn=config.double_dqn,
            huber_delta=config.huber_delta,
            mesh=mesh,
            owned=self._indices,
        )
        self.params = self._to_device(flat)
        self.target_params = self.params
        self.params_version = version
        self._target_epoch = version // config.target_period
        self.updates = 0
        self.frames = 0
        self.server_version = version
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self._outbox: queue.Queue = queue.Queue(maxsize=PUSH_QUEUE)
        self._in_flight: list[tuple[int, np.ndarray]] = []
        self._pull_wanted = threading.Event()
        # Params pulled by the communication thread, waiting for the main thread: the newest
        # (params, version), and the params of a target refresh, kept apart so a later pull
        # cannot overwrite a refresh before it is taken.
        self._incoming_lock = threading.Lock()
        self._incoming: tuple[Any, int] | None = None
        self._incoming_target: Any | None = None
        self._closing = threading.Event()
        self._quick = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._communicate, name="ps-client", daemon=True)
        self._thread.start()

    def _to_device(self, flat: np.ndarray) -> Any:
        return jax.device_put(self._unravel(jnp.asarray(flat)), self._where.replicated)

    def _deliver(self, params: Any, version: int, *, refresh_target: bool) -> None:
        """Hand pulled params to the main thread (called by the communication thread)."""
        with self._incoming_lock:
            self._incoming = (params, version)
            if refresh_target:
                self._incoming_target = params

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            incoming, self._incoming = self._incoming, None
            target, self._incoming_target = self._incoming_target, None
        if incoming is not None:
            self.params, self.params_version = incoming
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
        item = (grads, metrics.mean_abs_td, self.params_version)
        while not self._closing.is_set() and self.error is None:
            if self._stop.is_set():  # a signal: abandon in-flight requests, stop soon
                self.connection.cancel.set()
                break
            try:
                self._outbox.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        self.updates += 1
        if self.updates % self.config.sync_every == 0:
            self._pull_wanted.set()
        return metrics

    def should_stop(self) -> bool:
        """Stop when the communication thread has failed or a signal arrived."""
        return self.error is not None or self._stop.is_set()

    def _communicate(self) -> None:
        try:
            while not (self._closing.is_set() and self._outbox.empty() and not self._in_flight):
                try:
                    self._exchange()
                except ServerError as error:
                    if not error.lost or self._closing.is_set():
                        raise
                    self._reconnect(error)
        except BaseException as error:  # surfaced to the main thread through should_stop
            self.error = error
        finally:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        """Tell the server this bundle is done, then close the socket: in this thread, the
        only one that uses the socket once it runs.

        Stopped by a signal (`close(quick=True)`), wait only a moment for the server, which
        is stopping too; after an error, the server is gone or refused: just close.
        """
        try:
            if self._quick:
                self.connection.timeout_seconds = min(
                    self.connection.timeout_seconds, QUICK_STOP_SECONDS
                )
                with contextlib.suppress(ServerError):
                    self.connection.stop()
            elif self.error is None:
                self.connection.stop()
        except BaseException as error:
            self.error = error
        finally:
            self.connection.close()

    def _exchange(self) -> None:
        """Send queued gradients (up to PUSHES_IN_FLIGHT unacknowledged), collect the oldest
        acknowledgement, and pull when due. Keeping a second push in flight lets the server
        apply one gradient while the next one crosses the network."""
        while len(self._in_flight) < PUSHES_IN_FLIGHT:
            try:
                grads, loss, base_version = self._outbox.get(
                    timeout=0.0 if self._in_flight else 0.05
                )
            except queue.Empty:
                break
            grads = np.asarray(grads)
            seq = self.connection.send_push(
                grads, base_version=base_version, loss=float(loss), frames=self.frames,
                shard=self._shard,
            )  # fmt: skip
            self._in_flight.append((seq, grads))  # the frame is sent from this array
        if self._in_flight:
            seq, _ = self._in_flight[0]
            accepted, reason, version = self.connection.receive_ack(seq)
            self._in_flight.pop(0)
            self.server_version = max(self.server_version, version)
            if accepted:
                self.accepted += 1
            else:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
        refresh = self.server_version // self.config.target_period > self._target_epoch
        if refresh or self._pull_wanted.is_set():
            self._pull_wanted.clear()
            self._pull(refresh)

    def _reconnect(self, error: ServerError) -> None:
        """Say hello again, with backoff, for up to `server_retry_seconds`."""
        retry = self.config.server_retry_seconds
        deadline = time.monotonic() + retry
        delay = 0.5
        timeout = self.connection.timeout_seconds
        print(f"[bundle {self.connection.worker + 1}] lost the server ({error}); "
              f"reconnecting for up to {retry:.0f}s", flush=True)  # fmt: skip
        self.connection.timeout_seconds = min(timeout, 5.0)
        try:
            while not self._closing.is_set():
                self._in_flight.clear()  # their acknowledgements died with the connection
                self.connection.reconnect()
                try:
                    flat, version, _ = self.connection.hello()
                except ServerError as attempt:
                    if not attempt.lost or time.monotonic() + delay > deadline:
                        raise ServerError(
                            f"the server did not come back within {retry:.0f}s ({attempt})"
                        ) from None
                    self._closing.wait(delay)
                    delay = min(2 * delay, 10.0)
                    continue
                self.server_version = version
                self._target_epoch = version // self.config.target_period
                self._deliver(self._to_device(flat), version, refresh_target=True)
                self.reconnects += 1
                print(f"[bundle {self.connection.worker + 1}] reconnected at version "
                      f"{version}", flush=True)  # fmt: skip
                return
        finally:
            self.connection.timeout_seconds = timeout

    def _pull(self, refresh_target: bool) -> None:
        have = -1 if refresh_target else self.params_version
        flat, version = self.connection.pull(have)
        self.server_version = version
        if flat is not None:
            if refresh_target:
                self._target_epoch = version // self.config.target_period
            self._deliver(self._to_device(flat), version, refresh_target=refresh_target)

    def close(self, *, quick: bool = False) -> None:
        """Push what is queued, tell the server this bundle is done, close the socket (all
        done by the communication thread; this waits for it).

        `quick` (the run is being stopped by a signal): drop what is queued and give the
        server only a moment to acknowledge, since it is stopping too.
        """
        self._quick = quick
        self._closing.set()
        if quick:
            self.connection.cancel.set()
        waits = QUICK_STOP_SECONDS + 1 if quick else 2 * self.config.server_timeout_seconds + 5
        self._thread.join(timeout=waits)
        if self._thread.is_alive() and self.error is None:
            self.error = ServerError(f"the communication thread did not finish in {waits:.0f}s")
        if self.error is not None and not quick:
            raise ServerError(f"bundle lost the server: {self.error}") from self.error
