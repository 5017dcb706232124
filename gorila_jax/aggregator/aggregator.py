"""An aggregator: one per host (`--aggregate-per-host`), between the host's bundles and the
server's shards, so that each shard receives one push per host rather than one per bundle.

To its bundles it is an unsharded server: they say hello to it, push every gradient to it
and pull params from it, over the same wire protocol, and it checks their credentials and
sequence numbers as a shard would. To the shards it is one worker (its own credential,
`credentials.aggregator_credential`), with the client a bundle uses (`ShardedClient`).

What it does with a bundle's push: the checks a shard makes on arrival (credential, seq,
staleness against the params it hands out, a finite gradient within the clip), then the
gradient is added to the sum of those waiting, and the push is acknowledged at once
(accepted by the aggregator; what the shards say of the forward is counted in its own
statistics). The mean of the waiting gradients goes to the shards as one push once as
many gradients wait as the aggregator has active bundles (those that pushed within
`ACTIVE_SECONDS`), or the oldest has waited `FORWARD_WAIT_SECONDS`, and its client has
room: each shard then receives about one push per round of the host's bundles, and more
gradients a push when the shards answer slowly (the mean of clipped gradients stays within
the clip). A forward goes with the versions of the oldest params any of its gradients was
computed on, per shard, so the shards judge its staleness by its stalest part and DC-ASGD
compensates it from the params the aggregator was sent at those versions. Its frames are
the sum of its bundles' own.

Pulls: every forward asks the shards for the params after it, so the aggregator holds
params one forward old, and a bundle's pull is answered at once from them (and asks for
newer ones when no forward is under way): every shard answers about one pull per host per
round of its bundles, not one per bundle every `sync_every` steps. The version a bundle
sees is the mean of the shards' versions, as a bundle of a sharded server counts it, so
its target-network period keeps its meaning; the aggregator remembers which shard
versions each version it handed out stands for.

It checkpoints nothing: a restarted aggregator fetches the params again, and the gradients
waiting in its sum when it died are lost (a few learner steps); its bundles' frame counts
come back from their replay checkpoints. Its statistics go to RUN_DIR/aggregator{a}.json.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq

from gorila_jax.bundle.client import Push, ServerError, ShardedClient
from gorila_jax.core.config import Config
from gorila_jax.io.files import write_atomically
from gorila_jax.server.gradient_guard import gradient_refusal, max_norm_squared
from gorila_jax.server.parameter_server import max_message_bytes
from gorila_jax.wire import transport
from gorila_jax.wire.credentials import WorkerAuthority

log = logging.getLogger(__name__)

MAX_REQUEST_FRAMES = 2  # a header and at most one array
MAX_ERROR_MESSAGE = 200  # characters of detail in an error reply
TURN_SECONDS = 0.05  # the most time `serve` spends on messages before forwarding
POLL_SECONDS = 0.002  # how long the loop waits for a bundle's message with a sum waiting
ACTIVE_SECONDS = 2.0  # a bundle that pushed this recently is waited for before a forward
FORWARD_WAIT_SECONDS = 0.05  # the longest a gradient waits for the others of its round
MAX_CLOCK_SKEW_SECONDS = 3600.0  # how far a bundle's clock (its seq numbers) may run ahead


class Waiting(NamedTuple):
    """The gradients received since the last forward."""

    total: np.ndarray  # their sum (float32, owned by the aggregator)
    mean_abs_td: float  # the sum of their batches' mean |TD error|
    versions: tuple[int, ...]  # per shard, the oldest version any of them was computed on
    count: int
    since: float  # when the first of them came (the aggregator's timer)


class Aggregator:
    """One host's aggregator: its bundles' messages (`submit`) and the forwards to the
    shards (`forward`); the socket loop is `serve`."""

    def __init__(
        self,
        config: Config,
        upstream: ShardedClient,
        *,
        workers: Collection[int],
        authority: WorkerAuthority,
        fingerprint: str,
        run_dir: Path | None = None,
        index: int = 0,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
    ):
        """The aggregator `index` of the bundles `workers` (worker numbers; their requests
        `authority` authenticates), forwarding through `upstream`, a client of the shards
        that has said hello to them (its `initial` params are the first handed out)."""
        self.config = config
        self.upstream = upstream
        self.workers = frozenset(workers)
        self.authority = authority
        self.fingerprint = fingerprint
        self.index = index
        self.clock = clock
        self.timer = timer
        self.stats_path = None if run_dir is None else Path(run_dir) / f"aggregator{index + 1}.json"
        self.num_params = int(upstream.initial.flat.size)
        self.max_bytes = max_message_bytes(config, self.num_params)  # as its socket's
        self.max_norm_squared = max_norm_squared(config)
        # The params handed out, their version (the mean of the shards') and, for every
        # version handed out within max_staleness, the shard versions it stands for.
        self.flat = upstream.initial.flat
        self.version = 0
        self._shard_versions: collections.OrderedDict[int, tuple[int, ...]] = (
            collections.OrderedDict()
        )
        self._take(upstream.initial.versions, upstream.initial.flat)
        self.waiting: Waiting | None = None
        self.last_seq: dict[int, int] = {}
        self.frames: dict[int, int] = {}  # each bundle's latest report
        self._pushed_at: dict[int, float] = {}  # when each bundle last pushed (timer)
        self.stopped: set[int] = set()
        self.received = collections.Counter()  # pushes accepted here, per worker
        self.refused = collections.Counter()  # refused here, per reason
        self.forwards = 0
        self.forwarded_gradients = 0
        self.largest_forward = 0
        self.pulls = 0

    # ---- params from the shards --------------------------------------------------------

    def _take(self, versions: tuple[int, ...], flat: np.ndarray) -> None:
        self.flat = flat
        self.version = sum(versions) // len(versions)
        self._shard_versions[self.version] = tuple(versions)
        self._shard_versions.move_to_end(self.version)
        while next(iter(self._shard_versions)) < self.version - self.config.max_staleness:
            self._shard_versions.popitem(last=False)

    def take_params(self) -> bool:
        """Take the newest params the client has fetched, if any; True when it had some."""
        latest, target = self.upstream.latest()
        pulled = latest if latest is not None else target
        if pulled is None:
            return False
        self._take(pulled.versions, pulled.flat)
        return True

    # ---- the bundles' messages ---------------------------------------------------------

    def _vector_length(self, header: dict) -> int | None:
        return self.num_params if header["kind"] == "push" else None

    def _reply(self, request: dict, kind: str, arrays=(), **fields) -> list:
        header = transport.reply_header(
            request, kind, version=self.version, fingerprint=self.fingerprint, **fields
        )
        return transport.encode(header, arrays, validate=kind != "ack")

    def reject(self, reason: str, request: dict | None, message: str) -> list:
        """Count a refused message and build its error reply."""
        self.refused[reason] += 1
        return self._reply(request, "error", reason=reason, message=message[:MAX_ERROR_MESSAGE])

    def submit(self, frames: list) -> list:
        """Take one request from a bundle and return its reply's frames (never raises on
        input)."""
        try:
            message = transport.decode(
                frames,
                authenticate=self.authority.check,
                expected_fingerprint=self.fingerprint,
                layout_for=self._vector_length,
                max_bytes=self.max_bytes,
            )
        except transport.ProtocolError as error:
            return self.reject(error.reason, error.header, error.message)
        header = message.header
        worker, seq, kind = header["worker"], header["seq"], header["kind"]
        if kind == "join":
            return self.reject("no_join", header, "a run with aggregators takes no joins")
        if worker not in self.workers:
            return self.reject(
                "bad_worker", header, f"bundle {worker + 1} pushes to another aggregator"
            )
        if seq <= self.last_seq.get(worker, -1):
            return self.reject("replayed", header, f"seq {seq} already seen")
        if seq > (self.clock() + MAX_CLOCK_SKEW_SECONDS) * 1e9:
            return self.reject("future_seq", header, f"seq {seq} is ahead of the clock")
        self.last_seq[worker] = seq
        if kind == "push":
            return self._on_push(header, message.arrays[0])
        if kind == "pull":
            self.pulls += 1
            self.upstream.pull()  # newer params for the next pulls
            if header["version"] == self.version:
                return self._reply(header, "not_modified")
            return self._reply(header, "params", [self.flat])
        if kind == "hello":
            self.stopped.discard(worker)
            info = {
                "num_params": self.num_params,
                "server_shard": 0,
                "shard_layout": [0, self.num_params],
                "num_workers": len(self.workers),
                "part_size": self.num_params,
                "frames": self.frames.get(worker, 0),
            }
            return self._reply(header, "welcome", [self.flat], config=info)
        self.stopped.add(worker)  # a stop
        return self._reply(header, "ack", accepted=True, reason=None)

    def _refuse_push(self, header: dict, reason: str) -> list:
        self.refused[reason] += 1
        return self._reply(header, "ack", accepted=False, reason=reason)

    def _on_push(self, header: dict, grads: np.ndarray) -> list:
        base = header["version"]
        shard_versions = self._shard_versions.get(base)
        if shard_versions is None:  # from the future, too old, or an earlier life's
            return self._refuse_push(header, "stale")
        refusal = gradient_refusal(grads, header["mean_abs_td"], self.max_norm_squared)
        if refusal is not None:
            return self._refuse_push(header, refusal[0])
        worker = header["worker"]
        self.frames[worker] = max(self.frames.get(worker, 0), header["frames"])
        self.received[worker] += 1
        now = self.timer()
        self._pushed_at[worker] = now
        waiting = self.waiting
        if waiting is None:
            total = np.array(grads, dtype=np.float32)  # a copy: the frame is zmq's
            self.waiting = Waiting(total, header["mean_abs_td"], shard_versions, 1, now)
        else:
            np.add(waiting.total, grads, out=waiting.total)
            self.waiting = Waiting(
                waiting.total,
                waiting.mean_abs_td + header["mean_abs_td"],
                tuple(min(a, b) for a, b in zip(waiting.versions, shard_versions, strict=True)),
                waiting.count + 1,
                waiting.since,
            )
        return self._reply(header, "ack", accepted=True, reason=None)

    # ---- the shards --------------------------------------------------------------------

    def _active(self, now: float) -> int:
        """Bundles that pushed within `ACTIVE_SECONDS`."""
        return sum(now - at <= ACTIVE_SECONDS for at in self._pushed_at.values())

    def forward_due(self) -> bool:
        """Whether the waiting gradients should go: one from each active bundle is there
        (as many as there are active bundles), or the oldest has waited long enough."""
        waiting = self.waiting
        if waiting is None:
            return False
        now = self.timer()
        return waiting.count >= self._active(now) or now - waiting.since >= FORWARD_WAIT_SECONDS

    def forward(self, *, wait: bool = False) -> bool:
        """Hand the mean of the waiting gradients to the client when due and it has room
        (with `wait`, whatever is waiting, waiting for room); True when something went."""
        waiting = self.waiting
        if waiting is None or not (wait or (self.forward_due() and self.upstream.has_room())):
            return False
        self.waiting = None
        total = waiting.total
        if waiting.count > 1:
            total *= np.float32(1.0 / waiting.count)
        self.upstream.push(
            Push(
                total,
                waiting.mean_abs_td / waiting.count,
                waiting.versions,
                sum(self.frames.values()),
                pull=True,  # the params after it, for the bundles' next pulls
            )
        )
        self.forwards += 1
        self.forwarded_gradients += waiting.count
        self.largest_forward = max(self.largest_forward, waiting.count)
        return True

    def all_stopped(self) -> bool:
        """Every bundle of this aggregator has said it is done."""
        return self.stopped >= self.workers

    # ---- statistics --------------------------------------------------------------------

    def stats(self) -> dict:
        """What RUN_DIR/aggregator{a}.json holds."""
        return {
            "aggregator": self.index + 1,
            "workers": sorted(self.workers),
            "version": self.version,
            "received": {str(w): self.received[w] for w in sorted(self.workers)},
            "refused": dict(self.refused),
            "frames": {str(w): self.frames.get(w, 0) for w in sorted(self.workers)},
            "forwards": self.forwards,
            "forwarded_gradients": self.forwarded_gradients,
            "largest_forward": self.largest_forward,
            "gradients_per_forward": self.forwarded_gradients / max(self.forwards, 1),
            "shards_accepted": self.upstream.accepted,
            "shards_rejected": dict(self.upstream.rejected),
            "reconnects": self.upstream.reconnects,
            "pulls_answered": self.pulls,
            "stopped": sorted(self.stopped),
        }

    def write_stats(self) -> None:
        if self.stats_path is not None:
            write_atomically(self.stats_path, json.dumps(self.stats(), indent=1))

    # ---- serving -----------------------------------------------------------------------

    def serve(self, socket: zmq.Socket, should_stop: Callable[[], bool]) -> None:
        """Answer the bundles and forward to the shards until every bundle has stopped or
        `should_stop()`; then forward what waits (unless stopped) and close the client,
        which tells every shard this aggregator is done. ServerError when the shards are
        lost for good."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        next_stats = 0.0
        try:
            while not should_stop() and not self.all_stopped():
                if self.upstream.failed():
                    raise ServerError(f"lost the server: {self.upstream.error}")
                wait = POLL_SECONDS if self.waiting is not None else 0.05
                if poller.poll(timeout=wait * 1000):
                    self._answer(socket, time.monotonic() + TURN_SECONDS)
                self.take_params()
                self.forward()
                if self.clock() >= next_stats:
                    self.write_stats()
                    next_stats = self.clock() + self.config.stats_every_seconds
            quick = should_stop()
            if not quick:
                self.forward(wait=True)
            requests = 4 + len(self.upstream.connections)  # pushes, a pull, the stops
            timeout = (self.config.server_timeout_seconds + 1) * requests
            self.upstream.close(quick=quick, timeout_seconds=timeout)
        finally:
            self.write_stats()

    def _answer(self, socket: zmq.Socket, turn_ends: float) -> None:
        """Answer waiting messages until none is left or the turn has passed; forward
        between them whenever the client has room."""
        with np.errstate(over="ignore", invalid="ignore"):  # see `gradient_refusal`
            while True:
                try:
                    routing_id, frames = transport.recv(
                        socket, zmq.NOBLOCK, max_frames=MAX_REQUEST_FRAMES,
                        max_bytes=self.max_bytes,
                    )  # fmt: skip
                except zmq.Again:
                    return
                except transport.OversizedMessage as error:
                    routing_id = error.routing_id
                    reply = self.reject(error.reason, None, error.message)
                else:
                    reply = self.submit(frames)
                _send_reply(socket, routing_id, reply)
                self.forward()
                if time.monotonic() >= turn_ends:
                    return


def _send_reply(socket: zmq.Socket, peer: Any, reply: list) -> None:
    """Send without waiting: a reply to a bundle that is gone or does not read is dropped."""
    try:
        transport.send(socket, reply, peer, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    except zmq.ZMQError as error:
        if error.errno != zmq.EHOSTUNREACH:
            raise
