"""A bundle's client of the sharded parameter server: no JAX, only sockets and numpy.

`ServerConnection` speaks the wire protocol with one server process (a shard, or the whole
server) over one DEALER socket: every request gets one reply, matched by sequence number,
so several can be in flight. `ShardedClient` holds one connection per server shard and a
communication thread, the only one that touches the sockets once it runs. Its whole API:
`push` a gradient (with everything the thread needs to send it: the versions it was
computed on, its mean |TD error|, the frames played, whether to pull now),
`latest` params pulled since the last look (and a target refresh, if one came), and
`close`.

Each shard has its own window of `PUSHES_IN_FLIGHT` unacknowledged pushes. The shards
keep step while they answer: a push is taken from the queue only when every shard has
room in its window for it, so a shard that is merely slower holds the others back rather
than lose slices, and a gradient waits in one place only (the queue: at most
`PUSH_QUEUE` + `PUSHES_IN_FLIGHT` per bundle between its computation and the server,
which bounds how stale its pushes are). A shard that has not acknowledged its oldest push
for `STALLED_SECONDS` is stalled (cut off, or stuck): it no longer holds the others back;
its slices wait in a backlog of `PUSH_QUEUE`, whose oldest is dropped for each new one
(counted as `behind`), never the newest, so it delays only its own slice. A shard that
does not answer a request within `server_timeout_seconds` is lost: it is said hello to
again, with backoff, for up to `server_retry_seconds`, while pushes and pulls go on with
the others; a shard past that ends the bundle. Replies are read before deadlines are
looked at, so a reply that has arrived is never taken for a loss. Every wait is timed on
an `AwakeClock`, which leaves out time the process did not run (the job suspended with
SIGSTOP or `scontrol suspend`): a suspended and resumed job goes on without taking the
server for lost.

Pulls: every `push` that asks for one (the round goes out on the thread's next turn, ahead
of the gradients still queued, so the params are as fresh as the server's), and a target
refresh every `target_period` server updates (counted as the mean of the shards'
versions), ask every reachable shard for its newer slice; when all have answered (or been
lost, or the ones left are stalled), the joined vector is handed over, so a shard cut off
does not hold back the others' params.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import zmq

from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.wire import transport

log = logging.getLogger(__name__)

PUSH_QUEUE = 2  # gradients waiting for the thread (and per shard, waiting for its window)
PUSHES_IN_FLIGHT = 2  # unacknowledged pushes per shard
MAX_REPLY_FRAMES = 2  # a header and at most one array
QUICK_STOP_SECONDS = 2.0  # how long a bundle stopped by a signal waits for the stop's ack
HELLO_AGAIN_SECONDS = 5.0  # how long a hello to a lost server shard may take to be answered
IDLE_WAIT_SECONDS = 0.05  # the longest the thread sleeps with nothing in flight
STALLED_SECONDS = 2.0  # a shard this long without acknowledging its oldest push is stalled
SUSPENDED_SECONDS = 5.0  # a gap this long between two readings of the clock: not running
# What a welcome says (protocol 3): every field is required.
WELCOME_FIELDS = (
    "num_params",
    "server_shard",
    "shard_layout",
    "num_workers",
    "part_size",
    "frames",
)


class ServerError(RuntimeError):
    """The server refused a request (`reason`: the error reply's code, when it sent one),
    or did not answer in time (`lost`: worth a retry)."""

    def __init__(
        self, message: str, *, lost: bool = False, reason: str | None = None, detail: str = ""
    ):
        super().__init__(message)
        self.lost = lost
        self.reason = reason
        self.detail = detail  # the error reply's message


class AwakeClock:
    """Monotonic seconds, less the time the process did not run.

    The clock is read many times a second while a request waits (every poll is at most
    0.1 s), so a gap of more than `max_gap` between two readings means the process was
    stopped (SIGSTOP, a suspended SLURM job) or starved of CPU, not that the server kept
    silent: such a gap counts as `max_gap`. With `log_gaps`, each one is logged.
    """

    def __init__(self, max_gap: float = SUSPENDED_SECONDS, *, log_gaps: bool = False):
        self.max_gap = max_gap
        self.log_gaps = log_gaps
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._now = self._last
        self.skipped = 0.0  # seconds left out so far

    def __call__(self) -> float:
        with self._lock:
            real = time.monotonic()
            gap, self._last = real - self._last, real
            if gap > self.max_gap:
                self.skipped += gap - self.max_gap
                if self.log_gaps:
                    log.info(
                        f"did not run for {gap:.0f}s (suspended, or starved of CPU): "
                        "that time is not counted against the server"
                    )
                gap = self.max_gap
            self._now += gap
            return self._now


class ServerConnection:
    """Request/reply with the parameter server for one worker.

    Sequence numbers start at the wall clock in nanoseconds, so a restarted bundle numbers
    its requests above everything its earlier life sent (the server refuses any number it
    has seen). The socket lets the server assign its routing id; with `curve` keys it is
    encrypted and speaks only to the server holding that key. One thread at a time
    may use a connection; the tables of pending requests and early replies are guarded all
    the same. Deadlines are on `clock` (an `AwakeClock`; a `ShardedClient` gives its
    connections its own).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        credential: str,
        worker: int,
        fingerprint: str,
        num_params: int,
        max_bytes: int,
        timeout_seconds: float,
        cancel: threading.Event | None = None,
        curve: transport.ClientCurve | None = None,
    ):
        self.credential = credential
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
        self.clock = AwakeClock()
        self._connect()

    def _connect(self) -> None:
        socket = transport.make_client_socket(
            zmq.Context.instance(), self.endpoint, None, self.max_bytes, curve=self.curve,
            connect=False,
        )  # fmt: skip
        handshakes = None
        try:  # the watch first, so that it sees the first handshake
            handshakes = transport.HandshakeWatch(socket)
            socket.connect(self.endpoint)
        except BaseException:
            if handshakes is not None:
                handshakes.close()
            socket.close(linger=0)
            raise
        self._socket, self._handshakes = socket, handshakes
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    def handshake_failure(self) -> str | None:
        """Why the connection never opened, if zmq said why (a CURVE key mismatch)."""
        return self._handshakes.failure()

    def _unanswered(self, what: str) -> str:
        """`what` went wrong, and why the connection never opened if zmq said why."""
        failure = self.handshake_failure()
        return what if failure is None else f"{what}: {failure}"

    def reconnect(self) -> None:
        """A fresh socket: requests queued for a dead server are dropped, not replayed."""
        self.close()
        with self._lock:
            self._pending.clear()
            self._replies.clear()
        self._connect()

    def _vector_length(self, header: dict) -> int | None:
        return self.num_params if header["kind"] in ("welcome", "params") else None

    def send_request(
        self, kind: str, arrays=(), *, version: int = transport.NO_VERSION, **fields
    ) -> int:
        """Send one request without waiting; returns its sequence number.

        Arrays are sent without copying: keep them unchanged until the reply has arrived.
        """
        self.seq += 1
        header = transport.make_header(
            kind,
            credential=self.credential,
            worker=self.worker,
            seq=self.seq,
            version=version,
            fingerprint=self.fingerprint,
            **fields,
        )
        frames = transport.encode(header, arrays)
        try:
            # Never wait to queue: zmq refuses at once only when there is no connection to
            # take the message (its handshake was refused) or the server is not reading.
            transport.send(self._socket, frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise ServerError(
                self._unanswered(f"could not send {kind} to {self.endpoint}"), lost=True
            ) from None
        with self._lock:
            self._pending[self.seq] = (kind, self.clock() + self.timeout_seconds)
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
            while True:
                # Take what has arrived before looking at the clock: a reply that came
                # while this thread waited on another shard is an answer, not a loss.
                while self._poller.poll(timeout=0):
                    self._read_one(kind)
                if self._has_reply(seq):
                    break
                if interruptible and self.cancel.is_set():
                    raise ServerError(f"{kind} cancelled: the bundle is stopping")
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise ServerError(
                        self._unanswered(f"no reply to {kind} within {self.timeout_seconds:.0f}s"),
                        lost=True,
                    )
                if not wait:
                    return None
                if self._poller.poll(timeout=min(remaining, 0.1) * 1000):
                    self._read_one(kind)
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
        if reply.header["kind"] == "error" and reply.header["reason"] == "bad_protocol":
            raise ServerError(
                f"the server at {self.endpoint} speaks another wire protocol "
                f"({reply.header['message']}): run the same gorila_jax version on every host"
            )
        if reply.header["kind"] == "error":
            raise ServerError(
                f"server refused {kind}: {reply.header['reason']} ({reply.header['message']})",
                reason=reply.header["reason"],
                detail=reply.header["message"],
            )
        if reply.header["kind"] not in transport.ANSWERS[kind]:
            raise ServerError(f"bad reply to {kind}: a {reply.header['kind']!r} reply")
        return reply

    def _read_one(self, kind: str) -> None:
        """Read one reply from the socket into the table of replies (a late reply to a
        request given up on is dropped)."""
        try:
            _, frames = transport.recv(
                self._socket, max_frames=MAX_REPLY_FRAMES, max_bytes=self.max_bytes
            )
            reply = transport.decode_reply(
                frames,
                expected_fingerprint=self.fingerprint,
                layout_for=self._vector_length,
                max_bytes=self.max_bytes,
            )
        except transport.ProtocolError as error:
            if error.reason == "bad_protocol":
                raise ServerError(
                    f"the server at {self.endpoint} speaks another wire protocol "
                    f"({error.message}): run the same gorila_jax version on every host"
                ) from None
            raise ServerError(f"bad reply to {kind}: {error}") from None
        with self._lock:
            if reply.header["seq"] in self._pending:
                self._replies[reply.header["seq"]] = reply

    @property
    def socket(self) -> zmq.Socket:
        """The socket replies arrive on (to wait on several connections at once)."""
        return self._socket

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

    def send_pull(self, have_version: int) -> int:
        """Ask for params newer than `have_version` without waiting; returns the seq."""
        return self.send_request("pull", version=have_version)

    def receive_pulled(self, seq: int, *, wait: bool = True):
        """The reply to the pull `seq`: (params, or None if not modified; server version);
        with `wait=False`, None while it has not arrived."""
        reply = self.receive_reply(seq, wait=wait)
        if reply is None:
            return None
        params = reply.arrays[0] if reply.header["kind"] == "params" else None
        return params, reply.header["version"]

    def send_push(
        self, grads: np.ndarray, *, base_version: int, mean_abs_td: float, frames: int
    ) -> int:
        """Send a gradient (this worker's part of it, for this shard's slice) without
        waiting for its acknowledgement; returns its seq."""
        return self.send_request(
            "push", [grads], version=base_version, mean_abs_td=float(mean_abs_td), frames=frames
        )

    def receive_ack(self, seq: int, *, wait: bool = True):
        """(accepted, reason if not, server version) of the push `seq`; with `wait=False`,
        None while it has not arrived."""
        reply = self.receive_reply(seq, wait=wait)
        if reply is None:
            return None
        return reply.header["accepted"], reply.header["reason"], reply.header["version"]

    def stop(self) -> None:
        """Tell the server this worker is done (even while the bundle is being stopped)."""
        self.request("stop", interruptible=False)

    def close(self) -> None:
        """Close the socket."""
        self._handshakes.close()
        self._socket.close(linger=0)


class Push(NamedTuple):
    """One gradient for the server, with all the communication thread needs to send it."""

    grads: Any  # the flat gradient (a host or device array; read on the thread)
    mean_abs_td: float  # of the batch the gradient comes from, for the outlier filter
    versions: tuple[int, ...]  # per shard, the version of the params it was computed on
    frames: int  # frames this bundle has played, reported to the server
    pull: bool = False  # ask every shard for newer params as soon as this is queued


class Pulled(NamedTuple):
    """Params handed over by the communication thread: a new vector each time."""

    flat: np.ndarray
    versions: tuple[int, ...]  # per shard, the version of its slice


class _Lost(NamedTuple):
    """A server shard this bundle has lost: when it gives up, when it next says hello, the
    backoff after that, and the hello waiting for an answer (its seq)."""

    deadline: float
    next_attempt: float
    delay: float
    hello: int | None = None


class _Shard:
    """The communication thread's view of one server shard."""

    def __init__(self, connection: ServerConnection, version: int):
        self.connection = connection
        self.version = version  # the newest version it has told us
        self.held_version = version  # the version of the slice we hold
        self.backlog: collections.deque = collections.deque()  # (push id, piece, Push)
        # (push id, seq, the piece the frame is sent from, when it was sent)
        self.in_flight: collections.deque = collections.deque()
        self.pull: int | None = None  # seq of the pull waiting for its reply
        self.pull_sent = 0.0  # when it was sent
        self.lost: _Lost | None = None


class ShardedClient:
    """One bundle's client of a server in S shards (S >= 1); see the module docstring.

    `pieces[k]` is the part of a pushed vector that shard k gets (None: nothing, when
    this bundle's gradient part has no element in shard k's slice)."""

    def __init__(
        self,
        connections: list[ServerConnection],
        *,
        layout: ShardLayout,
        pieces: list[slice | None],
        target_period: int,
        retry_seconds: float,
        stop_event: threading.Event | None = None,
        names: list[str] | None = None,
    ):
        """`names`: how the log and the errors name each connection's server (default
        "the server", or "server shard k"); under SLURM, with its task and host."""
        self.layout = layout
        self._names = names
        self._pieces = pieces
        self._target_period = target_period
        self._retry_seconds = retry_seconds
        self._stop = stop_event or threading.Event()
        self._clock = AwakeClock(log_gaps=True)
        connections = list(connections)
        for connection in connections:
            connection.clock = self._clock
        slices, versions, frames = [], [], []
        try:
            for shard, connection in enumerate(connections):
                flat, version, info = self._first_hello(shard, connection)
                self._check_welcome(shard, info)
                slices.append(flat)
                versions.append(version)
                frames.append(info["frames"])
        except BaseException:  # no client to close later: close the sockets now
            for connection in connections:
                connection.close()
            raise
        self.start_frames = max(frames)
        self.initial = Pulled(layout.join(slices), tuple(versions))
        self._shards = [_Shard(c, v) for c, v in zip(connections, versions, strict=True)]
        self._host = self.initial.flat
        self._target_epoch = self.server_version // target_period
        self._pull_wanted = False
        self._pulling = False  # a round of pulls is out: its replies are being gathered
        self._pull_is_refresh = False
        self._fresh: dict[int, np.ndarray] = {}  # slices pulled, not yet handed over
        self._next_push_id = 0
        self._results: dict[int, dict[int, tuple[bool, str | None]]] = {}
        self._expected: dict[int, set[int]] = {}
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.reconnects = 0
        self.error: BaseException | None = None
        self._outbox: queue.Queue = queue.Queue(maxsize=PUSH_QUEUE)
        self._handover_lock = threading.Lock()
        self._latest: Pulled | None = None
        self._latest_target: Pulled | None = None
        self._closing = threading.Event()
        self._quick = False
        self._thread = threading.Thread(target=self._communicate, name="ps-client", daemon=True)
        self._thread.start()

    def _first_hello(self, shard: int, connection: ServerConnection):
        """Say hello to a shard until it answers, for up to `retry_seconds`: a shard that
        is still starting (binding before it compiles its update programs, slow on a
        loaded host) or restarting is not answering yet rather than lost. A refusal, or a
        connection whose handshake failed (wrong keys), ends at once."""
        give_up = self._clock() + self._retry_seconds
        while True:
            try:
                return connection.hello()
            except ServerError as error:
                refused = not error.lost or connection.handshake_failure() is not None
                if refused or self._stop.is_set():
                    raise
                if self._clock() >= give_up:
                    raise ServerError(
                        f"{self._name(shard)} did not answer hello within "
                        f"{self._retry_seconds:.0f}s ({error})",
                        lost=True,
                    ) from None
                log.warning(
                    f"{self._name(shard)} has not answered hello yet ({error}); saying "
                    f"hello again for up to {give_up - self._clock():.0f}s more"
                )

    def _check_welcome(self, shard: int, info: dict) -> None:
        """The welcome is protocol 3's (every field, of its type), and the server shard at
        this connection holds the slice this bundle expects, for the gradient part it
        pushes."""
        for name in WELCOME_FIELDS:
            value = info.get(name)
            valid = (
                isinstance(value, list) and all(type(v) is int for v in value)
                if name == "shard_layout"
                else type(value) is int and value >= 0
            )
            if not valid:
                raise ServerError(f"bad welcome from server shard {shard}: {name} {value!r}")
        layout = info["shard_layout"]
        if info["server_shard"] != shard or layout != list(self.layout.bounds):
            raise ServerError(
                f"server shard {shard} answered as shard {info['server_shard']} of "
                f"layout {layout}, expected {list(self.layout.bounds)}; same config?"
            )
        piece = self._pieces[shard]
        if info["part_size"] != (0 if piece is None else piece.stop - piece.start):
            raise ServerError("the server's gradient part differs from this bundle's; same config?")

    # ---- the main thread's API ---------------------------------------------------------

    @property
    def connections(self) -> list[ServerConnection]:
        return [shard.connection for shard in self._shards]

    @property
    def server_version(self) -> int:
        """Server updates: the mean of the shards' versions (the only version of one)."""
        return sum(shard.version for shard in self._shards) // len(self._shards)

    def push(self, item: Push) -> None:
        """Queue a gradient for the communication thread; blocks while `PUSH_QUEUE` wait,
        until the run stops or the thread has failed."""
        while not self._closing.is_set() and self.error is None:
            if self._stop.is_set():  # a signal: abandon in-flight requests, stop soon
                for shard in self._shards:
                    shard.connection.cancel.set()
                return
            try:
                self._outbox.put(item, timeout=0.1)
            except queue.Full:
                continue
            if item.pull:  # now: a pull behind the queued gradients would come back staler
                self._pull_wanted = True
            return

    def has_room(self) -> bool:
        """Whether `push` would queue a gradient at once (an aggregator sums what comes
        meanwhile, rather than wait)."""
        return not self._outbox.full()

    def pull(self) -> None:
        """Ask every shard for newer params without pushing (an aggregator, for its
        bundles' pulls): the thread sends the round on its next turn, or after the round
        out now. Setting the flag races only with the thread clearing it as it starts a
        round, which fetches newer params all the same."""
        self._pull_wanted = True

    def latest(self) -> tuple[Pulled | None, Pulled | None]:
        """The newest params pulled since the last look, and the newest target refresh
        (each None when none came): a refresh is kept apart, so a later plain pull cannot
        replace it before it is taken."""
        with self._handover_lock:
            latest, self._latest = self._latest, None
            target, self._latest_target = self._latest_target, None
        return latest, target

    def failed(self) -> bool:
        return self.error is not None

    def close(self, *, quick: bool = False, timeout_seconds: float) -> None:
        """Push what is queued, tell every shard this bundle is done, close the sockets
        (all done by the communication thread; this waits up to `timeout_seconds`).

        `quick` (the run is being stopped by a signal): drop what is queued and give the
        server only a moment to acknowledge, since it is stopping too.
        """
        self._quick = quick
        self._closing.set()
        if quick:
            for shard in self._shards:
                shard.connection.cancel.set()
        self._thread.join(timeout=timeout_seconds)
        if self._thread.is_alive() and self.error is None:
            self.error = ServerError(
                f"the communication thread did not finish in {timeout_seconds:.0f}s"
            )
        if self.error is not None and not quick:
            raise ServerError(f"bundle lost the server: {self.error}") from self.error

    # ---- the communication thread ------------------------------------------------------

    def _communicate(self) -> None:
        try:
            while True:
                if self._closing.is_set() and self._quick:
                    break  # stopped by a signal: what is queued is dropped
                if any(shard.lost for shard in self._shards) and not self._quick:
                    self._say_hello_again()
                busy = self._take_pushes()
                busy = self._send_pushes() or busy
                busy = self._collect() or busy
                busy = self._pull_when_due() or busy
                idle = self._outbox.empty() and not any(
                    s.backlog or s.in_flight or s.pull is not None for s in self._shards
                )
                lost = any(shard.lost for shard in self._shards)
                # A normal close waits for lost shards to come back (or for their deadline,
                # an error), so that every shard hears this bundle's stop.
                if self._closing.is_set() and idle and (self._quick or not lost):
                    break
                if not busy:
                    self._wait(IDLE_WAIT_SECONDS if idle else 0.01)
        except BaseException as error:  # surfaced to the main thread through `failed`
            self.error = error
        finally:
            self._say_goodbye()

    def _wait(self, seconds: float) -> None:
        """Sleep until a reply may have arrived on any socket, or `seconds` pass."""
        sockets = [
            s.connection.socket
            for s in self._shards
            if not s.lost and isinstance(getattr(s.connection, "socket", None), zmq.Socket)
        ]
        if sockets:
            zmq.select(sockets, [], [], seconds)
        else:
            time.sleep(min(seconds, 0.001))

    def _stalled(self, shard: _Shard, now: float) -> bool:
        return bool(shard.in_flight) and now - shard.in_flight[0][3] > STALLED_SECONDS

    def _room(self) -> bool:
        """Whether a queued gradient can be taken: every reachable shard that answers has
        room in its window of pushes in flight, so the gradient is sent at once (a stalled
        shard holds nobody back), and one at least answers."""
        now = self._clock()
        answering = [s for s in self._shards if not s.lost and not self._stalled(s, now)]
        return bool(answering) and all(
            len(s.backlog) + len(s.in_flight) < PUSHES_IN_FLIGHT for s in answering
        )

    def _take_pushes(self) -> bool:
        """Move queued gradients into the shards' backlogs while `_room` says so; a
        stalled shard's full backlog drops its oldest slice (that shard is behind)."""
        moved = False
        while self._room():
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            moved = True
            grads = np.asarray(item.grads)
            push_id, self._next_push_id = self._next_push_id, self._next_push_id + 1
            expected = set()
            for shard_index, (shard, piece) in enumerate(
                zip(self._shards, self._pieces, strict=True)
            ):
                if piece is None or shard.lost:
                    continue
                if len(shard.backlog) >= PUSH_QUEUE:
                    dropped, _, _ = shard.backlog.popleft()
                    self._settle(dropped, shard_index, (False, "behind"))
                shard.backlog.append((push_id, grads[piece], item))
                expected.add(shard_index)
            self._expected[push_id] = expected
            self._results[push_id] = {}
            self._finish_if_settled(push_id)
        return moved

    def _send_pushes(self) -> bool:
        sent = False
        for index, shard in enumerate(self._shards):
            while shard.backlog and not shard.lost and len(shard.in_flight) < PUSHES_IN_FLIGHT:
                push_id, piece, item = shard.backlog[0]
                seq = self._call(
                    index, shard.connection.send_push, piece, base_version=item.versions[index],
                    mean_abs_td=float(item.mean_abs_td), frames=item.frames,
                )  # fmt: skip
                if seq is None:  # lost: its backlog, this slice included, was dropped
                    break
                shard.backlog.popleft()
                # The frame is sent from `piece` without a copy: keep it until the ack.
                shard.in_flight.append((push_id, seq, piece, self._clock()))
                sent = True
        return sent

    def _collect(self) -> bool:
        """Take every acknowledgement and pulled slice that has arrived, shard by shard."""
        progressed = False
        for index, shard in enumerate(self._shards):
            while shard.in_flight and not shard.lost:
                push_id, seq, _, _ = shard.in_flight[0]
                ack = self._call(index, shard.connection.receive_ack, seq, wait=False)
                if ack is None:
                    break
                shard.in_flight.popleft()
                accepted, reason, version = ack
                shard.version = max(shard.version, version)
                self._settle(push_id, index, (accepted, reason))
                progressed = True
            if shard.pull is not None and not shard.lost:
                reply = self._call(index, shard.connection.receive_pulled, shard.pull, wait=False)
                if reply is not None:
                    shard.pull = None
                    flat, version = reply
                    shard.version = version
                    if flat is not None:
                        self._fresh[index] = flat
                        shard.held_version = version
                    progressed = True
        if self._pulling and self._round_done():
            self._hand_over_pull()
        return progressed

    def _round_done(self) -> bool:
        """A round of pulls is over when every shard asked has answered, or those that
        have not are stalled: the slices that came are not held back by a shard cut off
        (its reply, when it comes, goes with the next hand-over)."""
        now = self._clock()
        return all(s.pull is None or now - s.pull_sent > STALLED_SECONDS for s in self._shards)

    def _settle(self, push_id: int, shard: int, result: tuple[bool, str | None]) -> None:
        results = self._results.get(push_id)
        if results is None:
            return
        results[shard] = result
        self._finish_if_settled(push_id)

    def _finish_if_settled(self, push_id: int) -> None:
        """Count a push once every shard it went to has answered or been given up."""
        results, expected = self._results[push_id], self._expected[push_id]
        if not expected <= set(results):
            return
        del self._results[push_id], self._expected[push_id]
        if results and all(accepted for accepted, _ in results.values()):
            self.accepted += 1
        for reason in {reason for accepted, reason in results.values() if not accepted}:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _pull_when_due(self) -> bool:
        """Ask every reachable shard for its newer slice at once (a target refresh asks
        for the slice whatever its version)."""
        if self._pulling:
            return False
        refresh = self.server_version // self._target_period > self._target_epoch
        if not (refresh or self._pull_wanted):
            return False
        self._pull_wanted = False
        self._pulling, self._pull_is_refresh = True, refresh
        for index, shard in enumerate(self._shards):
            if shard.lost or shard.pull is not None:  # still waiting for its last reply
                continue
            have = -1 if refresh else shard.held_version
            shard.pull = self._call(index, shard.connection.send_pull, have)
            shard.pull_sent = self._clock()
        if all(s.pull is None for s in self._shards):
            self._pulling = False
        return True

    def _hand_over_pull(self) -> None:
        self._pulling = False
        if not self._fresh:
            return
        self._host = self._with_slices(self._fresh)
        self._fresh = {}
        refresh = self._pull_is_refresh
        if refresh:
            self._target_epoch = self.server_version // self._target_period
        self._deliver(refresh_target=refresh)

    def _deliver(self, *, refresh_target: bool) -> None:
        pulled = Pulled(self._host, tuple(shard.held_version for shard in self._shards))
        with self._handover_lock:
            self._latest = pulled
            if refresh_target:
                self._latest_target = pulled

    def _with_slices(self, fresh: dict[int, np.ndarray]) -> np.ndarray:
        """A new host vector: the `fresh` slices (by shard) and the current ones elsewhere.
        Never written in place, since the old vector may still be in use; one copy at most,
        none with one shard."""
        slices = self.layout.split(self._host)
        for shard, flat in fresh.items():
            slices[shard] = flat
        return slices[0] if len(slices) == 1 else self.layout.join(slices)

    def _call(self, index: int, method, *args, **kwargs):
        """`method(*args, **kwargs)` of a shard's connection; a lost reply marks the shard
        lost (None is returned; closing or not, it is said hello again until its deadline),
        any other refusal is raised."""
        try:
            return method(*args, **kwargs)
        except ServerError as error:
            if not error.lost:
                raise
            self._lose(index, error)
            return None

    def _lose(self, index: int, error: ServerError) -> None:
        """Mark a shard lost: its pending acknowledgements and its pull died with the
        connection, its waiting slices are dropped."""
        shard = self._shards[index]
        now = self._clock()
        shard.lost = _Lost(now + self._retry_seconds, now, 0.5)
        for push_id, *_ in (*shard.in_flight, *shard.backlog):
            self._expected.get(push_id, set()).discard(index)
            if push_id in self._results:
                self._finish_if_settled(push_id)
        shard.in_flight.clear()
        shard.backlog.clear()
        shard.pull = None
        log.warning(
            f"lost {self._name(index)} ({error}); reconnecting for up to {self._retry_seconds:.0f}s"
        )

    def _name(self, index: int) -> str:
        if self._names is not None:
            return self._names[index]
        return "the server" if self.layout.num_shards == 1 else f"server shard {index}"

    def _say_hello_again(self) -> None:
        """Say hello again to every lost shard whose backoff has passed, without waiting
        for the answer (the others are being pushed to meanwhile); take the answers that
        have come. A shard past its deadline ends the bundle (ServerError)."""
        for index, shard in enumerate(self._shards):
            lost, connection = shard.lost, shard.connection
            if lost is None:
                continue
            if lost.hello is None:
                if self._clock() < lost.next_attempt:
                    continue
                connection.reconnect()
                timeout = connection.timeout_seconds
                connection.timeout_seconds = min(timeout, HELLO_AGAIN_SECONDS)
                try:
                    shard.lost = lost._replace(hello=connection.send_request("hello"))
                except ServerError as attempt:
                    self._hello_failed(index, attempt)
                finally:
                    connection.timeout_seconds = timeout
                continue
            try:
                reply = connection.receive_reply(lost.hello, wait=False)
            except ServerError as attempt:
                self._hello_failed(index, attempt)
                continue
            if reply is None:
                continue
            flat, version, info = reply.arrays[0], reply.header["version"], reply.header["config"]
            self._check_welcome(index, info)
            shard.lost = None
            shard.version = shard.held_version = version
            self._host = self._with_slices({index: flat})
            self._target_epoch = self.server_version // self._target_period
            self._deliver(refresh_target=True)
            self.reconnects += 1
            log.info(f"reconnected to {self._name(index)} at version {version}")

    def _hello_failed(self, index: int, attempt: ServerError) -> None:
        """A hello to a lost shard went unanswered (or could not be sent): try again after
        the backoff, or end the bundle once that would pass the shard's deadline."""
        shard = self._shards[index]
        lost = shard.lost
        if not attempt.lost or self._clock() + lost.delay > lost.deadline:
            raise ServerError(
                f"{self._name(index)} did not come back within "
                f"{self._retry_seconds:.0f}s ({attempt})"
            ) from None
        shard.lost = lost._replace(
            hello=None,
            next_attempt=self._clock() + lost.delay,
            delay=min(2 * lost.delay, 10.0),
        )

    def _say_goodbye(self) -> None:
        """Tell every shard this bundle is done, then close the sockets: in this thread,
        the only one that uses them once it runs.

        Stopped by a signal (`close(quick=True)`), wait only a moment for the server, which
        is stopping too; after an error, the server is gone or refused: just close.
        """
        # A signal sets the connections' cancel event before `close(quick=True)` comes:
        # the wait it cut short is no error of the server's, and the stop must still go.
        quick = self._quick or any(s.connection.cancel.is_set() for s in self._shards)
        for shard in self._shards:
            connection = shard.connection
            try:
                if quick:
                    connection.timeout_seconds = min(connection.timeout_seconds, QUICK_STOP_SECONDS)
                    with contextlib.suppress(ServerError):
                        connection.stop()
                elif self.error is None and shard.lost is None:
                    connection.stop()
            except BaseException as error:  # the other shards still get their stop
                self.error = self.error or error
        for shard in self._shards:
            shard.connection.close()
