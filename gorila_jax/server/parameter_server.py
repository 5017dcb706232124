"""The parameter server: holds the Q-network, applies pushed gradients, answers pulls.

State: a `ShardState` (`gorila_jax.server.shard_state`): the parameters as one flat float32 vector
(`ravel_pytree` order), the optax state of the optimizer the config names (DC-ASGD chained
in front when configured), and `version`, the number of updates applied. Each accepted push
goes through the shard state's pure jitted apply; a partial push (a gradient part)
updates only the owned elements of the parameters and of every element-wise optimizer
statistic.

`ParameterServer` is the stateful shell around it, testable without a network: it validates
each message and answers it through a table of handlers (`handle`), applies the safeguards,
keeps the protocol's state (each worker's last sequence number, the workers that stopped,
DC-ASGD's record of the params each worker was sent) and writes checkpoints. Its counters
and statistics are a `ServerStats` (`gorila_jax.server.server_stats`), `counters`. The socket loop
is the function `serve`.

The paper's safeguards, each counted in the statistics:
- "stale": the gradient was computed on params more than `max_staleness` versions old;
- "non_finite": the gradient holds a NaN or an infinity;
- "outlier": the push's mean |TD error| is over the median of recent pushes + k robust
  standard deviations;
and two of ours: "over_norm", the gradient's norm is over what the bundle's clipping
allows (`max_grad_norm`; with clipping off, a norm whose square overflows float32): a
bundle with broken clipping must not poison Adam's second moments for everyone; and
"non_finite_update", refused once the params or the optimizer state have stopped being
finite (a float overflow of the params: the server then stops, see below).

Batched absorb. `serve` takes every request waiting (up to `MAX_BATCH` pushes) before it
applies anything: each push is judged on arrival (`submit`) against the version it will
be applied at, in the order the pushes came, and waits in a batch; the batch is applied in
one call of the shard state's apply (`flush`) at the end of the turn, or before a hello or
a stop. Pulls wait for the batch too and get the params after it (fresher than
one at a time would give; at load every `sync_every`-th push comes with a pull, and
flushing for each would cut batches to a few pushes). Versions, staleness, the outlier
filter, DC-ASGD's stale params and the counters are exactly those of applying the pushes
one at a time; the apply's dispatch is paid once per batch, and nothing is read back from
it.

The guard is in two parts. On arrival, one pass over the gradient (its squared norm, which
is not finite when an element is not) refuses a non-finite or over-norm push alone, so
every update is built from a finite, bounded gradient, and the optimizer statistics stay
finite. What is left is an overflow of the params themselves (an absurd learning rate):
`check_finite` looks at the host copy of the params the server makes for every pull (once
per version), before every checkpoint and with every ps.json, one BLAS pass each. When
they are not finite, the server refuses every push, pull and hello ("non_finite_update"),
writes no checkpoint, and `serve` raises `ParamsDiverged`: the process exits with an error
and a restart resumes from the last checkpoint, which is never non-finite. Non-finite
params are never sent to a bundle or saved.

Every message is validated by `gorila_jax.wire.transport.decode` before anything is used; a
bad one gets an error reply and a counter, and never changes the parameters. Only a request
whose credential is its worker's (`gorila_jax.wire.credentials`) moves anything kept per
worker (counters, the last sequence number); the others are counted under "unauthenticated".
Sequence numbers must grow over a worker's whole life, hellos included, so no request is
accepted twice. `serve` handles a bounded amount of work per turn of its loop, so
checkpoints, ps.json and stopping happen on time under any load. Statistics are written to
RUN_DIR/ps.json every few seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax.core.config import Config
from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.core.optim import config_optimizer
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.io.checkpoint import CheckpointError, run_meta
from gorila_jax.server.gradient_guard import gradient_refusal, max_norm_squared
from gorila_jax.server.server_stats import ServerStats, server_dir
from gorila_jax.server.shard_state import (
    Push,
    ShardState,
    init_shard_state,
    make_apply,
    state_is_finite,
)
from gorila_jax.server.stale_params import StaleParams
from gorila_jax.wire import transport
from gorila_jax.wire.credentials import WorkerAuthority

log = logging.getLogger(__name__)

OUTLIER_WINDOW = 512  # recent push losses the outlier filter judges against
OUTLIER_REFRESH = 16  # losses between fresh computations of the filter's threshold
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a normal
MIN_RELATIVE_SPREAD = 0.01  # the filter's spread is at least this fraction of the median
MAX_ERROR_MESSAGE = 200  # characters of detail in an error reply
MAX_REQUEST_FRAMES = 2  # a header and at most one array
TURN_SECONDS = 0.05  # the most time `serve` spends on messages before its other duties
MAX_BATCH = 32  # pushes applied in one call of the shard state's apply
CHECKPOINT_RETRY_SECONDS = 1.0  # the first wait after a failed checkpoint (then doubling)
MAX_CLOCK_SKEW_SECONDS = 3600.0  # how far a bundle's clock (its seq numbers) may run ahead
MAX_FRAMES_PER_SECOND = 1_000_000  # frames a bundle could report per second, generously
# What a server checkpoint's meta holds besides `run_meta` (restore refuses one without).
SERVER_META_FIELDS = (
    "version",
    "server_shard",
    "shard_layout",
    "last_seq",
    "stopped_workers",
    "outliers",
    "workers",
    "frames",
    "rejections",
    "staleness_histogram",
    "events",
)


class ParamsDiverged(RuntimeError):
    """The params or the optimizer state stopped being finite (`check_finite`)."""


class OutlierFilter:
    """Median and median absolute deviation (MAD) of the last `window` push losses.

    A loss is an outlier above median + k * max(1.4826 * MAD, 1% of the median). Both
    statistics ignore a few extreme values, so one huge loss cannot raise the threshold
    (a running mean and variance would be dragged up by it for thousands of pushes, or for
    good once its square overflowed), while a lasting change of the loss level moves them
    within half a window.
    """

    def __init__(self, k: float, warmup: int, window: int = OUTLIER_WINDOW):
        self.k = k
        self.warmup = warmup
        self.count = 0
        self.losses: deque[float] = deque(maxlen=window)
        self._threshold: tuple[int, float] | None = None  # (count it was computed at, it)

    def threshold(self) -> float:
        """The loss above which a push is an outlier now (inf before any loss)."""
        if not self.losses:
            return math.inf
        losses = np.fromiter(self.losses, np.float64, len(self.losses))
        median = float(np.median(losses))
        mad = float(np.median(np.abs(losses - median)))
        spread = max(MAD_TO_STD * mad, MIN_RELATIVE_SPREAD * abs(median), 1e-12)
        return median + self.k * spread

    def is_outlier(self, loss: float) -> bool:
        """Judge `loss` (finite) against the recent losses, then fold it in.

        The threshold (two medians over the window, ~20 us) is computed afresh every
        `OUTLIER_REFRESH` losses and for any loss above the last one computed, so a loss
        is only ever refused against an up-to-date threshold; a loss under a threshold up
        to `OUTLIER_REFRESH` losses old is accepted, even if the threshold has since come
        down below it (a window of 512 moves little in 16 losses).
        """
        judged = self.k > 0 and self.count >= self.warmup
        outlier = False
        if judged:
            cached = self._threshold
            if cached is None or self.count - cached[0] >= OUTLIER_REFRESH or loss > cached[1]:
                cached = self._threshold = (self.count, self.threshold())
            outlier = loss > cached[1]
        self.count += 1
        self.losses.append(float(loss))
        return outlier

    def state(self) -> dict:
        """The filter as JSON values, for a checkpoint."""
        return {"count": self.count, "losses": list(self.losses)}

    def load(self, state: dict) -> None:
        """Continue from `state()` (a checkpoint's, checked by `ParameterServer.restore`)."""
        losses = [float(x) for x in state["losses"] if math.isfinite(float(x))]
        self.losses.clear()
        self.losses.extend(losses)
        self.count = int(state["count"])
        self._threshold = None


class ParameterServer:
    """One server process's state and message handling (the socket loop is `serve`)."""

    def __init__(
        self,
        config: Config,
        params_tree: Any,
        *,
        num_workers: int,
        authority: WorkerAuthority,
        run_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        shard: int = 0,
        state: ShardState | None = None,
        launched: int | None = None,
    ):
        """A server (shard `shard` of `config.server_shards`) of `params_tree`'s network for
        `num_workers` bundles, whose requests `authority` authenticates. It starts from
        version 0 of those params, or from `state` (its slice's params, optimizer state
        and version) where given; a checkpoint is taken back with `restore`.

        `launched` (default: all of them) of the workers were started with the run; the
        others, up to `num_workers` (`--max-bundles`), are for bundles that join it while
        it runs (`join`, on shard 0). The run is over when the launched workers have all
        stopped and no joined one is still active."""
        self.config = config
        self.num_workers = num_workers
        self.launched = num_workers if launched is None else launched
        if not 1 <= self.launched <= num_workers:
            raise ValueError(f"{self.launched} launched workers of {num_workers}")
        if authority.num_workers != num_workers:
            raise ValueError(f"credentials for {authority.num_workers} workers, not {num_workers}")
        self.authority = authority
        self.run_dir = run_dir
        self.clock = clock
        flat, self.unravel = ravel_pytree(params_tree)
        self.total_params = int(flat.size)
        # ValueError (one line) for 0 shards or more shards than parameters.
        self.layout = ShardLayout.even(self.total_params, config.server_shards)
        if not 0 <= shard < self.layout.num_shards:
            raise ValueError(f"shard {shard} is outside 0..{self.layout.num_shards - 1}")
        self.shard = shard
        # This process's files: RUN_DIR itself, or RUN_DIR/shard{k} for a sharded server.
        self.own_dir = None if run_dir is None else server_dir(run_dir, shard, config.server_shards)
        flat = flat[self.layout.slice(shard)]
        self.num_params = int(flat.size)  # the elements this shard holds
        self.fingerprint = transport.tree_fingerprint(params_tree)
        self.tx = config_optimizer(config, server=True)
        self.state = init_shard_state(self.tx, flat) if state is None else state
        if self.state.params.shape != flat.shape:
            raise ValueError(
                f"a state of {self.state.params.shape} params for a slice of {flat.shape}"
            )
        self._apply = make_apply(self.tx, self.num_params, compensated=config.dc_asgd != "off")
        # Gradient parts: the elements of this shard's slice each worker pushes (None: all
        # of them), relative to the slice's start, and how many that is.
        self.parts = {w: self._part_here(w) for w in range(num_workers)}
        self._device_parts = {
            w: (None if idx is None else jnp.asarray(idx)) for w, idx in self.parts.items()
        }
        self._part_sizes = {
            w: self.num_params if idx is None else len(idx) for w, idx in self.parts.items()
        }
        # DC-ASGD: the params each worker was sent, by version (None without DC-ASGD).
        self.stale_params = StaleParams(config.max_staleness) if config.dc_asgd != "off" else None
        self._host_params: tuple[int, np.ndarray] | None = None
        self.outliers = OutlierFilter(config.outlier_k, config.outlier_warmup)
        self.max_bytes = max_message_bytes(config, self.num_params)
        self.max_norm_squared = max_norm_squared(config)  # see `gradient_guard`
        # Pushes accepted on arrival and not applied yet: (peer, header, Push, staleness);
        # pulls waiting for them to be applied: (peer, header).
        self._batch: list[tuple[Any, dict, Push, int]] = []
        self._pulls: list[tuple[Any, dict]] = []
        self.diverged: str | None = None  # why the server stopped applying, once it has
        self.started = clock()
        self.counters = ServerStats(clock, self.started)
        self.last_seq: dict[int, int] = {}
        self._frames_at: dict[int, float] = {}  # when each worker last reported its frames
        self.stopped_workers: set[int] = set()
        # Joined workers (indices past the launched ones) that have not stopped, and when
        # each worker was last heard from: a joined bundle silent for as long as a bundle
        # retries a lost server (`server_retry_seconds`) is gone, and its index free again.
        self.joined: set[int] = set()
        self._heard: dict[int, float] = {}
        self._last_join_seq = -1
        self.checkpointed_version = -1
        self._checkpointed_stops: frozenset[int] = frozenset()
        self.checkpointed_at = clock()
        self._retry_at, self._retry_delay = -math.inf, CHECKPOINT_RETRY_SECONDS
        self._handlers: dict[str, Callable[[dict, list], list]] = {
            "hello": self._on_hello,
            "pull": self._on_pull,
            "stop": self._on_stop,
            "join": self._on_join,
        }

    def _part_here(self, worker: int) -> np.ndarray | None:
        owned = part_indices(
            self.total_params, self.num_workers, worker, self.config.gradient_part,
            self.config.seed,
        )  # fmt: skip
        if owned is None:
            return None
        return self.layout.split_indices(owned)[self.shard][1]

    # ---- state ---------------------------------------------------------------------------

    @property
    def params(self) -> jax.Array:
        """The flat params (the shard state's)."""
        return self.state.params

    @property
    def opt_state(self) -> Any:
        """The optimizer state (the shard state's)."""
        return self.state.opt_state

    @property
    def version(self) -> int:
        """Updates applied so far (the shard state's)."""
        return self.state.version

    def params_tree(self) -> Any:
        """The current params as the network's pytree (an unsharded server only)."""
        if self.layout.num_shards != 1:
            raise ValueError("a server shard holds a slice of the params, not the tree")
        return self.unravel(self.params)

    def host_params(self) -> np.ndarray:
        """A host copy of the current flat params, made once per version for every pull
        (and checked: see `check_finite`)."""
        if self._host_params is None or self._host_params[0] != self.version:
            self._host_params = (self.version, np.array(self.params, dtype=np.float32))
            if not state_is_finite(self._host_params[1]):
                self._diverge("the params")
        return self._host_params[1]

    def check_finite(self) -> bool:
        """Whether the params and the optimizer state are finite; if not, the server
        stops applying (`diverged`). Built from finite, bounded gradients (the checks on
        arrival) they can only stop being finite when the params overflow, through an
        absurd learning rate. Checked on the host copy of the params made for every pull,
        before every checkpoint and with every ps.json (every `stats_every_seconds`)."""
        if self.diverged is None:
            self.host_params()
        if self.diverged is None and not state_is_finite(self.host_params(), self.opt_state):
            self._diverge("the optimizer state")
        return self.diverged is None

    def _diverge(self, what: str) -> None:
        self.diverged = (
            f"{what} stopped being finite by version {self.version} (an update overflowed: "
            "lower the learning rate; the last checkpoint is finite)"
        )
        log.error(self.diverged)

    # ---- messages ------------------------------------------------------------------------

    def _vector_length(self, header: dict) -> int | None:
        """The elements a request's vector must have: a push carries its worker's gradient
        part; no other request carries one (the worker is authenticated already)."""
        return self._part_sizes[header["worker"]] if header["kind"] == "push" else None

    def reject(
        self, reason: str, request: dict | None, message: str, *, authenticated: bool
    ) -> list:
        """Count a refused message and build its error reply.

        Only an `authenticated` request (its credential was its worker's) is counted
        against the worker it names; any other is counted under "unauthenticated",
        whatever worker it claims.
        """
        worker = request.get("worker") if request else None
        if not (isinstance(worker, int) and 0 <= worker < self.num_workers):
            worker = None
        if request and request.get("kind") == "join":  # its worker field names nobody
            worker = None
        self.counters.refused(reason, worker, authenticated=authenticated)
        if len(message) > MAX_ERROR_MESSAGE:  # details may quote the request at length
            message = message[:MAX_ERROR_MESSAGE] + "..."
        return transport.encode(
            transport.reply_header(
                request,
                "error",
                version=self.version + len(self._batch),  # as one push at a time would say
                fingerprint=self.fingerprint,
                reason=reason,
                message=message,
            )
        )

    def handle(self, frames: list) -> list:
        """Validate one request, apply it if it is an accepted push, and return the frames
        of its reply (never raises on input): `submit` then `flush`."""
        with np.errstate(over="ignore", invalid="ignore"):  # see `gradient_refusal`
            ready = self.submit(frames)
            ready += self.flush()
        return [frames for peer, frames in ready if peer is None][-1]

    def submit(
        self, frames: list, peer: Any = None, client_key: str | None = None
    ) -> list[tuple[Any, list]]:
        """Take one request from `peer` (a routing id) whose connection zmq authenticated
        with the CURVE key `client_key` (z85; None without CURVE); return the (peer, reply
        frames) ready to send: the replies of the batch this request made the server
        apply first, if any, then this request's, unless it is an accepted push, whose
        ack comes with its batch's `flush`. Never raises on input."""
        ready: list[tuple[Any, list]] = []
        reply = self._receive(frames, peer, client_key, ready)
        if reply is not None:
            ready.append((peer, reply))
        if len(self._batch) >= MAX_BATCH:
            ready += self.flush()
        return ready

    def _receive(self, frames: list, peer: Any, client_key: str | None, ready: list) -> list | None:
        try:
            message = transport.decode(
                frames,
                authenticate=lambda header: self.authority.check(header, client_key),
                expected_fingerprint=self.fingerprint,
                layout_for=self._vector_length,
                max_bytes=self.max_bytes,
            )
        except transport.ProtocolError as error:
            return self.reject(
                error.reason, error.header, error.message, authenticated=error.authenticated
            )
        header = message.header
        worker, seq = header["worker"], header["seq"]
        if header["kind"] == "join":  # names no worker yet: its seq is the joins' own
            if seq <= self._last_join_seq:
                return self.reject("replayed", header, f"seq {seq} seen", authenticated=True)
            self._last_join_seq = seq
            ready += self.flush()
            return self._on_join(header, message.arrays)
        now = self.clock()
        self._heard[worker] = now
        # Hellos included: a restarted worker numbers on from where it was (see
        # bundle.client), so a request seen once is refused for good.
        if seq <= self.last_seq.get(worker, -1):
            return self.reject("replayed", header, f"seq {seq} already seen", authenticated=True)
        # Bundles number from the wall clock in ns (bundle.client), one a request: a
        # number far above it would lock the worker's real requests out for good.
        if seq > (now + MAX_CLOCK_SKEW_SECONDS) * 1e9:
            return self.reject(
                "future_seq", header, f"seq {seq} is ahead of the clock", authenticated=True
            )
        self.last_seq[worker] = seq
        if header["kind"] == "push":
            return self._on_push(header, message.arrays, peer)
        if self.diverged is not None:
            return self.reject("non_finite_update", header, self.diverged, authenticated=True)
        if header["kind"] == "pull":  # answered with the params after the batch
            self._pulls.append((peer, header))
            return None
        ready += self.flush()  # what follows reads the params or the version
        return self._handlers[header["kind"]](header, message.arrays)

    def _reply(self, request: dict, kind: str, arrays=(), *, version=None, **fields) -> list:
        header = transport.reply_header(
            request,
            kind,
            version=self.version if version is None else version,
            fingerprint=self.fingerprint,
            **fields,
        )
        # An ack is built here from a validated request's fields: not validated again (it
        # is most of what the server sends at load); every other reply is.
        return transport.encode(header, arrays, validate=kind != "ack")

    def _send_params(self, request: dict, kind: str, **fields) -> list:
        host = self.host_params()
        if self.diverged is not None:
            return self.reject("non_finite_update", request, self.diverged, authenticated=True)
        worker = request["worker"]
        self.counters.pulled(worker, self.version)
        if self.stale_params is not None:
            self.stale_params.sent(worker, self.version, self.params)
        return self._reply(request, kind, [host], **fields)

    def _on_hello(self, header: dict, arrays) -> list:
        worker = header["worker"]
        self.counters.hello(worker)
        self.stopped_workers.discard(worker)
        if worker >= self.launched:
            self.joined.add(worker)
        info = {
            "num_params": self.num_params,
            "server_shard": self.shard,
            "shard_layout": list(self.layout.bounds),
            "num_workers": self.num_workers,
            "part_size": self._part_sizes[worker],
            "frames": self.counters.frames.get(worker, 0),
        }
        return self._send_params(header, "welcome", config=info)

    def _on_pull(self, header: dict, arrays) -> list:
        if header["version"] == self.version:
            return self._reply(header, "not_modified")
        return self._send_params(header, "params")

    def _on_stop(self, header: dict, arrays) -> list:
        self.stopped_workers.add(header["worker"])
        self.joined.discard(header["worker"])
        return self._reply(header, "ack", accepted=True, reason=None)

    def _on_join(self, header: dict, arrays) -> list:
        """Hand a bundle started with `--join` the lowest worker index that is free (never
        a launched one, nor a joined one still active); shard 0 alone hands them out."""
        if self.shard != 0 or self.launched == self.num_workers:
            return self.reject(
                "no_join",
                header,
                "this run takes no joining bundles (start it with --max-bundles)"
                if self.shard == 0
                else f"joins go to server shard 0, not shard {self.shard}",
                authenticated=True,
            )
        active = self.active_joined()
        free = [w for w in range(self.launched, self.num_workers) if w not in active]
        if not free:
            return self.reject(
                "full",
                header,
                f"all {self.num_workers} bundles the run has room for (--max-bundles) are running",
                authenticated=True,
            )
        worker = free[0]
        self.joined.add(worker)
        self._heard[worker] = self.clock()  # held for it until it has been silent too long
        self.stopped_workers.discard(worker)
        log.info(f"bundle {worker + 1} joins (worker {worker})")
        return self._reply(
            header,
            "joined",
            assigned=worker,
            frame_budget=self.config.total_frames // self.launched,
            launched=self.launched,
        )

    def active_joined(self) -> set[int]:
        """Joined workers that have not stopped and were heard from within
        `server_retry_seconds` (one silent longer has given up on the server, or died)."""
        now = self.clock()
        patience = self.config.server_retry_seconds
        return {w for w in self.joined if now - self._heard.get(w, -math.inf) <= patience}

    def _on_push(self, header: dict, arrays, peer: Any) -> list | None:
        """Judge a push against the version it would be applied at (the current one plus
        the pushes waiting in the batch): its ack now when refused, else None, and the
        push waits in the batch."""
        worker = header["worker"]
        if not self._plausible_frames(worker, header["frames"]):
            return self._refuse_push(
                header, "implausible_frames", f"frames {header['frames']} jump too far"
            )
        self.counters.frames_reported(worker, header["frames"])
        self._frames_at[worker] = self.clock()
        if self.diverged is not None:
            return self._refuse_push(header, "non_finite_update", self.diverged)
        at_version = self.version + len(self._batch)
        staleness = at_version - header["version"]
        if header["version"] < 0 or staleness < 0:
            return self._refuse_push(header, "stale", "version from the future")
        if staleness > self.config.max_staleness:
            return self._refuse_push(header, "stale", f"{staleness} versions old")
        (grads,) = arrays
        refusal = gradient_refusal(grads, header["mean_abs_td"], self.max_norm_squared)
        if refusal is not None:
            return self._refuse_push(header, *refusal)
        if self.outliers.is_outlier(abs(header["mean_abs_td"])):
            return self._refuse_push(header, "outlier", f"mean_abs_td {header['mean_abs_td']:.4g}")
        push = Push(
            grads, self._device_parts[worker], self._stale_params(worker, header["version"])
        )
        self._batch.append((peer, header, push, staleness))
        return None

    def _plausible_frames(self, worker: int, frames: int) -> bool:
        """Whether a push's frame count is one the bundle could have reached since its last
        report (or since this server started): a bogus count, stored and handed back in
        the welcome, would make a restarted bundle start past its budget."""
        since = self._frames_at.get(worker, self.started)
        reached = self.counters.frames.get(worker, 0)
        elapsed = max(0.0, self.clock() - since)  # a wall clock stepped back: no time
        return frames <= reached + (elapsed + 1.0) * MAX_FRAMES_PER_SECOND

    def _stale_params(self, worker: int, base_version: int | None) -> jax.Array | None:
        """DC-ASGD: the params `worker` was sent at `base_version` (None: no compensation)."""
        if self.stale_params is None:
            return None
        return self.stale_params.for_push(worker, base_version)

    def _refuse_push(self, header: dict, reason: str, message: str) -> list:
        self.counters.refused(reason, header["worker"], authenticated=True)
        # The version the server will be at once the pushes waiting before it are applied,
        # as if they had been applied one at a time.
        version = self.version + len(self._batch)
        return self._reply(header, "ack", version=version, accepted=False, reason=reason)

    def flush(self) -> list[tuple[Any, list]]:
        """Apply the waiting pushes in one call of the shard state's apply; their acks,
        each with the version right after its own update, then the replies of the pulls
        that came with them, with the params after the whole batch (a pull does not cut
        a batch short: at load one bundle in `sync_every` pulls with each push); a pull that
        finds the params not finite (`check_finite`) gets an error instead."""
        acks = self._apply_batch()
        pulls, self._pulls = self._pulls, []
        for peer, header in pulls:
            if self.diverged is not None:
                reply = self.reject("non_finite_update", header, self.diverged, authenticated=True)
            else:
                reply = self._on_pull(header, [])
            acks.append((peer, reply))
        return acks

    def _apply_batch(self) -> list[tuple[Any, list]]:
        if not self._batch:
            return []
        batch, start = self._batch, self.version
        self.state = self._apply(self.state, [push for _, _, push, _ in batch])
        self._batch = []  # only once applied: a failed apply leaves them to be answered
        acks = []
        for offset, (peer, header, _, staleness) in enumerate(batch, start=1):
            self.counters.accepted(header["worker"], staleness)
            acks.append(
                (
                    peer,
                    self._reply(header, "ack", version=start + offset, accepted=True, reason=None),
                )
            )
        return acks

    def apply(self, worker: int, grads: np.ndarray, base_version: int | None = None) -> None:
        """Apply one gradient (whole or the worker's part) now, unjudged, and bump the
        version: for tests and benchmarks. With DC-ASGD the stale params are those `worker`
        was sent at `base_version` (None: its latest pull)."""
        push = Push(grads, self._device_parts[worker], self._stale_params(worker, base_version))
        self.state = self._apply(self.state, [push])

    def warm_up(self) -> None:
        """Compile the apply for every batch size before serving (see `shard_state`)."""
        self._apply.warm_up(self.state)

    # ---- statistics ----------------------------------------------------------------------

    def stats(self) -> dict:
        """The statistics of ps.json (`ServerStats.snapshot`)."""
        return self.counters.snapshot(
            self.version,
            stopped_workers=sorted(self.stopped_workers),
            checkpointed_version=self.checkpointed_version,
            num_workers=self.num_workers,
            launched=self.launched,
            joined=sorted(self.active_joined()),
            num_params=self.num_params,
            server_shard=self.shard,
            server_shards=self.layout.num_shards,
            gradient_part=self.config.gradient_part,
            dc_asgd=self.config.dc_asgd,
        )

    def write_stats(self, address: str) -> None:
        """Write ps.json and TensorBoard's figures into this server's directory (none without
        a run directory); see `ServerStats.write`."""
        if self.own_dir is None:
            return
        self.counters.write(
            self.stats(),
            address=address,
            own_dir=self.own_dir,
            run_dir=self.run_dir,
            shard=self.shard,
            shards=self.layout.num_shards,
        )

    def all_workers_stopped(self) -> bool:
        """Every bundle started with the run has said it is done, and no joined one is
        still active."""
        launched_done = all(w in self.stopped_workers for w in range(self.launched))
        return launched_done and not self.active_joined()

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict, dict]:
        """The arrays and the JSON document that make up a checkpoint of this server."""
        state = {"params": self.params, "opt_state": self.opt_state}
        meta = {
            "version": self.version,
            **run_meta(self.config),
            "tree_fingerprint": self.fingerprint,
            "server_shard": self.shard,
            "shard_layout": list(self.layout.bounds),
            "num_workers": self.num_workers,
            **self.counters.state(),
            "last_seq": {str(w): s for w, s in self.last_seq.items()},
            "stopped_workers": sorted(self.stopped_workers),
            "outliers": self.outliers.state(),
        }
        return state, meta

    def restore(self, state: dict, meta: dict) -> None:
        """Continue from a checkpoint: params, optimizer state, version and every counter,
        the workers that had stopped (unless all had) and each worker's last sequence
        number. A checkpoint that lacks part of a server's meta, or of another shard or shard
        layout, is refused (CheckpointError) before anything changes."""
        missing = [name for name in SERVER_META_FIELDS if name not in meta]
        outliers = meta.get("outliers")
        if missing or not (isinstance(outliers, dict) and {"count", "losses"} <= set(outliers)):
            raise CheckpointError(
                f"the checkpoint's meta lacks {', '.join(missing) or 'the outlier filter'}: "
                "not a server checkpoint this version of gorila_jax wrote"
            )
        layout, shard = meta["shard_layout"], meta["server_shard"]
        if layout != list(self.layout.bounds) or shard != self.shard:
            raise CheckpointError(
                f"the checkpoint holds shard {shard} of layout {layout}, this process is shard "
                f"{self.shard} of {list(self.layout.bounds)}; resume with the same "
                "--server-shards, or use another --run-dir"
            )
        self.state = ShardState(
            jnp.asarray(state["params"], jnp.float32), state["opt_state"], int(meta["version"])
        )
        self.counters.load(meta)
        self.last_seq = {int(w): int(s) for w, s in meta["last_seq"].items()}
        stopped = {int(w) for w in meta["stopped_workers"]}
        # Every worker had stopped: the run had ended, and this start continues it with
        # bundles that will say hello. Otherwise those that stopped will not stop again.
        ended = all(w in stopped for w in range(self.launched))
        self.stopped_workers = set() if ended else stopped
        self.outliers.load(meta["outliers"])
        self.checkpointed_version = self.version
        self._checkpointed_stops = frozenset(self.stopped_workers)

    def _unsaved(self) -> bool:
        return (
            self.version != self.checkpointed_version
            or self.stopped_workers != self._checkpointed_stops
        )

    def save_checkpoint(self, checkpointer) -> bool:
        """Write a checkpoint of the current state unless it is saved; True when written.

        A worker's stop changes the state without a new version: the checkpoint of that
        version is then written again. Non-finite params are never saved, and a write that
        fails or that the checkpointer refuses is one warning line: `checkpointed_version`
        only ever names a checkpoint that exists. After a failure `checkpoint_due` waits
        `CHECKPOINT_RETRY_SECONDS` before the next try, doubling up to
        `checkpoint_every_seconds` (a full disk is not retried every serve turn).
        """
        self.checkpointed_at = self.clock()
        if not self._unsaved():
            return False
        if not self.check_finite():
            log.warning(f"version {self.version} is non-finite; not checkpointed")
            return False
        state, meta = self.checkpoint_state()
        try:
            saved = checkpointer.save(
                self.version, state, meta, replace=self.version == self.checkpointed_version
            )
        except Exception as error:  # a full disk must not stop the server
            self._checkpoint_failed()
            log.warning(
                f"checkpoint {self.version} failed: {type(error).__name__}: {error}; next "
                f"try in {self._retry_delay / 2:.0f} s or at the end"
            )
            return False
        if not saved:
            self._checkpoint_failed()
            log.warning(f"checkpoint {self.version} was not written (a newer one is on disk)")
            return False
        self.checkpointed_version = self.version
        self._checkpointed_stops = frozenset(self.stopped_workers)
        self._retry_at, self._retry_delay = -math.inf, CHECKPOINT_RETRY_SECONDS
        return True

    def _checkpoint_failed(self) -> None:
        self._retry_at = self.clock() + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, self.config.checkpoint_every_seconds)

    def checkpoint_due(self) -> bool:
        """Every `checkpoint_every_updates` updates or `checkpoint_every_seconds` seconds,
        and as soon as a worker has stopped (a restarted server must know it); never before
        the retry time of a failed checkpoint."""
        if not self._unsaved() or self.clock() < self._retry_at:
            return False
        if self.stopped_workers != self._checkpointed_stops:
            return True
        updates = self.version - max(self.checkpointed_version, 0)
        return (
            updates >= self.config.checkpoint_every_updates
            or self.clock() - self.checkpointed_at >= self.config.checkpoint_every_seconds
        )

    # ---- serving -------------------------------------------------------------------------

    def serve(self, socket, address, should_stop, checkpointer=None, *, turn_seconds=TURN_SECONDS):
        """Answer requests on `socket` until done: the module's `serve` with this server."""
        serve(self, socket, address, should_stop, checkpointer, turn_seconds=turn_seconds)


def serve(
    server: ParameterServer,
    socket: zmq.Socket,
    address: str,
    should_stop: Callable[[], bool],
    checkpointer=None,
    *,
    turn_seconds: float = TURN_SECONDS,
) -> None:
    """Answer requests until every bundle has stopped or `should_stop()` is true.

    Each turn of the loop answers messages for at most `turn_seconds` (at least one), then
    checkpoints when due, writes ps.json when due and looks at `should_stop`: a flood of
    messages, bad or good, delays none of them by more than a turn. With a `checkpointer`,
    checkpoints are written when due and once at the end. Raises `ParamsDiverged` (after
    writing ps.json, with no checkpoint) when the server's state stopped being finite.
    """
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    next_stats = 0.0
    while not should_stop() and not server.all_workers_stopped() and not server.diverged:
        if poller.poll(timeout=100):
            _answer(server, socket, time.monotonic() + turn_seconds)
        if server.diverged:
            break
        if checkpointer is not None and server.checkpoint_due():
            server.save_checkpoint(checkpointer)
        if server.clock() >= next_stats:
            server.check_finite()
            server.write_stats(address)
            next_stats = server.clock() + server.config.stats_every_seconds
    if checkpointer is not None and not server.diverged:
        server.save_checkpoint(checkpointer)
    server.write_stats(address)
    if server.diverged:
        raise ParamsDiverged(server.diverged)


def _answer(server: ParameterServer, socket: zmq.Socket, turn_ends: float) -> None:
    """Receive and submit waiting messages until none is left or `turn_ends` (monotonic
    time) has passed, at least one when one is waiting; send each reply as soon as it is
    ready, and the acks of the pushes still batched once the batch is applied at the end."""
    with np.errstate(over="ignore", invalid="ignore"):  # once a turn: see `gradient_refusal`
        try:
            while True:
                try:
                    routing_id, frames = transport.recv(
                        socket, zmq.NOBLOCK, max_frames=MAX_REQUEST_FRAMES,
                        max_bytes=server.max_bytes,
                    )  # fmt: skip
                except zmq.Again:
                    return
                except transport.OversizedMessage as error:
                    reply = server.reject(error.reason, None, error.message, authenticated=False)
                    ready = [(error.routing_id, reply)]
                else:
                    ready = server.submit(frames, routing_id, _client_key(server, frames))
                for peer, reply in ready:
                    _send_reply(server, socket, peer, reply)
                if time.monotonic() >= turn_ends:
                    return
        finally:
            for peer, reply in server.flush():
                _send_reply(server, socket, peer, reply)


def _client_key(server: ParameterServer, frames: list) -> str | None:
    """The z85 CURVE key zmq authenticated a request's connection with (its ZAP User-Id;
    None without CURVE)."""
    if server.authority.curve_workers is None or not frames:
        return None
    return frames[0].get("User-Id")


def _send_reply(server: ParameterServer, socket: zmq.Socket, peer: bytes, reply: list) -> None:
    """Send without waiting: a reply to a peer whose queue is full (it asks and does not
    read) or that is gone is dropped and counted (ps.json's events), never waited for."""
    try:
        transport.send(socket, reply, peer, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        server.counters.events["reply_dropped_queue_full"] += 1
    except zmq.ZMQError as error:
        if error.errno != zmq.EHOSTUNREACH:
            raise
        server.counters.events["reply_dropped_peer_gone"] += 1


def max_message_bytes(config: Config, num_params: int) -> int:
    """The message size limit of both ends: `max_message_mb`, or when it is 0 the largest
    legitimate message (the flat float32 params and a header) plus headroom."""
    if config.max_message_mb:
        return config.max_message_mb * 1024 * 1024
    return transport.message_limit(4 * num_params)
