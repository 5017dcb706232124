"""The parameter server: holds the Q-network, applies pushed gradients, answers pulls.

State: a `ShardState` (`gorila_jax.shard_state`): the parameters as one flat float32 vector
(`ravel_pytree` order), the optax state of the optimizer the config names (DC-ASGD chained
in front when configured), and `version`, the number of updates applied. Each accepted push
goes through the shard state's pure jitted apply; a partial push (gradient sharding)
updates only the owned elements of the parameters and of every element-wise optimizer
statistic.

`ParameterServer` is the stateful shell around it, testable without a network: it validates
each message and answers it through a table of handlers (`handle`), applies the safeguards,
keeps the protocol's state (each worker's last sequence number, the workers that stopped,
DC-ASGD's record of the params each worker was sent) and writes checkpoints. Its counters
and statistics are a `ServerStats` (`gorila_jax.server_stats`), `counters`. The socket loop
is the function `serve`.

The paper's safeguards, each counted in the statistics:
- "stale": the gradient was computed on params more than `max_staleness` versions old;
- "non_finite": the gradient holds a NaN or an infinity;
- "outlier": the push's mean |TD error| is over the median of recent pushes + k robust
  standard deviations;
and one of ours: "non_finite_update", the apply would have made the parameters or the
optimizer state non-finite (it is undone inside the jitted apply).

Every message is validated by `gorila_jax.transport.decode` before anything is used; a bad
one gets an error reply and a counter, and never changes the parameters. Only a request
that presented the run token moves anything kept per worker (counters, the last sequence
number); the others are counted under "unauthenticated". Sequence numbers must grow over
a worker's whole life, hellos included, so no request is accepted twice. `serve` handles a
bounded amount of work per turn of its loop, so checkpoints, ps.json and stopping happen on
time under any load. Statistics are written to RUN_DIR/ps.json every few seconds.
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

from gorila_jax import transport
from gorila_jax.checkpoint import CheckpointError, run_meta
from gorila_jax.config import Config
from gorila_jax.gradient_shards import shard_indices
from gorila_jax.optim import config_optimizer
from gorila_jax.server_stats import ServerStats, server_dir
from gorila_jax.shard_layout import ShardLayout
from gorila_jax.shard_state import init_shard_state, make_apply

log = logging.getLogger(__name__)

OUTLIER_WINDOW = 512  # recent push losses the outlier filter judges against
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a normal
MIN_RELATIVE_SPREAD = 0.01  # the filter's spread is at least this fraction of the median
MAX_ERROR_MESSAGE = 200  # characters of detail in an error reply
MAX_REQUEST_FRAMES = 2  # a header and at most one array
TURN_SECONDS = 0.05  # the most time `serve` spends on messages before its other duties


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
        """Judge `loss` (finite) against the recent losses, then fold it in."""
        judged = self.k > 0 and self.count >= self.warmup
        outlier = judged and loss > self.threshold()
        self.count += 1
        self.losses.append(float(loss))
        return outlier

    def state(self) -> dict:
        """The filter as JSON values, for a checkpoint."""
        return {"count": self.count, "losses": list(self.losses)}

    def load(self, state: Any) -> None:
        """Continue from `state()`; anything else (an older format) starts afresh."""
        if isinstance(state, dict) and isinstance(state.get("losses"), list):
            losses = [float(x) for x in state["losses"] if math.isfinite(float(x))]
            self.losses.clear()
            self.losses.extend(losses)
            self.count = int(state.get("count", len(losses)))


class ParameterServer:
    """One server process's state and message handling (the socket loop is `serve`)."""

    def __init__(
        self,
        config: Config,
        params_tree: Any,
        *,
        num_workers: int,
        token: str,
        run_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        shard: int = 0,
    ):
        self.config = config
        self.num_workers = num_workers
        self.token = token
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
        self.state = init_shard_state(self.tx, flat)
        self._apply = make_apply(self.tx, self.num_params, compensated=config.dc_asgd != "off")
        # Gradient sharding: the elements of this shard's slice each worker pushes (None:
        # all of them), relative to the slice's start.
        self.shards = {w: self._owned_here(w) for w in range(num_workers)}
        self._device_shards = {
            w: (None if idx is None else jnp.asarray(idx)) for w, idx in self.shards.items()
        }
        self.uses_dc_asgd = config.dc_asgd != "off"
        # DC-ASGD: worker -> {version: the params it was sent at that version}. Gradients a
        # bundle queued before a pull arrive after it, so the stale params are looked up by
        # the push's base version, not taken from the latest pull.
        self.pulled: dict[int, dict[int, jnp.ndarray]] = {}
        self._host_params: tuple[int, np.ndarray] | None = None
        self.outliers = OutlierFilter(config.outlier_k, config.outlier_warmup)
        self.max_bytes = max_message_bytes(config, self.num_params)
        self.started = clock()
        self.counters = ServerStats(clock, self.started)
        self.last_seq: dict[int, int] = {}
        self.stopped_workers: set[int] = set()
        self.checkpointed_version = -1
        self._checkpointed_stops: frozenset[int] = frozenset()
        self.checkpointed_at = clock()
        self._handlers: dict[str, Callable[[dict, list], list]] = {
            "hello": self._on_hello,
            "pull": self._on_pull,
            "push": self._on_push,
            "stats": self._on_stats,
            "stop": self._on_stop,
        }

    def _owned_here(self, worker: int) -> np.ndarray | None:
        owned = shard_indices(
            self.total_params, self.num_workers, worker, self.config.shard_factor,
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

    @params.setter
    def params(self, value) -> None:
        self.state = self.state._replace(params=jnp.asarray(value, jnp.float32))

    @property
    def opt_state(self) -> Any:
        """The optimizer state (the shard state's)."""
        return self.state.opt_state

    @opt_state.setter
    def opt_state(self, value) -> None:
        self.state = self.state._replace(opt_state=value)

    @property
    def version(self) -> int:
        """Updates applied so far (the shard state's)."""
        return self.state.version

    @version.setter
    def version(self, value: int) -> None:
        self.state = self.state._replace(version=int(value))

    def params_tree(self) -> Any:
        """The current params as the network's pytree (an unsharded server only)."""
        if self.layout.num_shards != 1:
            raise ValueError("a server shard holds a slice of the params, not the tree")
        return self.unravel(self.params)

    def host_params(self) -> np.ndarray:
        """A host copy of the current flat params, made once per version for every pull."""
        if self._host_params is None or self._host_params[0] != self.version:
            self._host_params = (self.version, np.array(self.params, dtype=np.float32))
        return self._host_params[1]

    # ---- messages ------------------------------------------------------------------------

    def _specs_for(self, header: dict):
        if header["kind"] != "push":
            return None
        worker = header["worker"]
        if worker >= self.num_workers:
            raise transport.ProtocolError(
                "bad_worker", f"worker {worker} >= {self.num_workers}", header
            )
        indices = self.shards[worker]
        expected_shard = None if indices is None else worker
        if header["shard"] != expected_shard:
            raise transport.ProtocolError(
                "bad_shard", f"worker {worker} owns shard {expected_shard}", header
            )
        size = self.num_params if indices is None else len(indices)
        return (transport.vector_spec(size),)

    def reject(
        self, reason: str, request: dict | None, message: str, *, authenticated: bool
    ) -> list:
        """Count a refused message and build its error reply.

        Only an `authenticated` request (its token was right) is counted against the worker
        it names; any other is counted under "unauthenticated", whatever worker it claims.
        """
        worker = request.get("worker") if request else None
        if not (isinstance(worker, int) and 0 <= worker < self.num_workers):
            worker = None
        self.counters.refused(reason, worker, authenticated=authenticated)
        if len(message) > MAX_ERROR_MESSAGE:  # details may quote the request at length
            message = message[:MAX_ERROR_MESSAGE] + "..."
        return transport.encode(
            transport.reply_header(
                request,
                "error",
                version=self.version,
                fingerprint=self.fingerprint,
                reason=reason,
                message=message,
            )
        )

    def handle(self, frames: list) -> list:
        """Validate one request and return the frames of its reply (never raises on input)."""
        try:
            message = transport.decode(
                frames,
                expected_token=self.token,
                expected_fingerprint=self.fingerprint,
                layout_for=self._specs_for,
                max_bytes=self.max_bytes,
            )
        except transport.ProtocolError as error:
            return self.reject(
                error.reason, error.header, error.message, authenticated=error.authenticated
            )
        header = message.header
        worker, seq = header["worker"], header["seq"]
        if header["kind"] != "stats" and worker >= self.num_workers:
            return self.reject(
                "bad_worker",
                header,
                f"worker {worker} >= {self.num_workers}",
                authenticated=True,
            )
        if worker < self.num_workers:
            # Hellos included: a restarted worker numbers on from where it was (see
            # ps_client), so a request seen once is refused for good.
            if seq <= self.last_seq.get(worker, -1):
                return self.reject(
                    "replayed", header, f"seq {seq} already seen", authenticated=True
                )
            self.last_seq[worker] = seq
        return self._handlers[header["kind"]](header, message.arrays)

    def _reply(self, request: dict, kind: str, arrays=(), **fields) -> list:
        header = transport.reply_header(
            request, kind, version=self.version, fingerprint=self.fingerprint, **fields
        )
        return transport.encode(header, arrays)

    def _send_params(self, request: dict, kind: str, **fields) -> list:
        worker = request["worker"]
        self.counters.pulled(worker, self.version)
        if self.uses_dc_asgd:
            held = self.pulled.setdefault(worker, {})
            held[self.version] = self.params  # a reference: jax arrays are immutable
            too_old = self.version - self.config.max_staleness  # pushes on these are refused
            for version in [v for v in held if v < too_old]:
                del held[version]
        return self._reply(request, kind, [self.host_params()], **fields)

    def _on_hello(self, header: dict, arrays) -> list:
        worker = header["worker"]
        self.counters.hello(worker)
        self.stopped_workers.discard(worker)
        indices = self.shards[worker]
        info = {
            "num_params": self.num_params,
            "server_shard": self.shard,
            "shard_layout": list(self.layout.bounds),
            "num_workers": self.num_workers,
            "shard": None if indices is None else worker,
            "shard_size": self.num_params if indices is None else len(indices),
            "frames": self.counters.frames.get(worker, 0),
        }
        return self._send_params(header, "welcome", config=info)

    def _on_pull(self, header: dict, arrays) -> list:
        if header["version"] == self.version:
            return self._reply(header, "not_modified")
        return self._send_params(header, "params")

    def _on_stats(self, header: dict, arrays) -> list:
        return self._reply(header, "stats_reply", stats=self.stats())

    def _on_stop(self, header: dict, arrays) -> list:
        self.stopped_workers.add(header["worker"])
        return self._reply(header, "ack", accepted=True, reason=None)

    def _on_push(self, header: dict, arrays) -> list:
        worker = header["worker"]
        self.counters.frames_reported(worker, header["frames"])
        staleness = self.version - header["version"]
        if header["version"] < 0 or staleness < 0:
            return self._refuse_push(header, "stale", "version from the future")
        if staleness > self.config.max_staleness:
            return self._refuse_push(header, "stale", f"{staleness} versions old")
        (grads,) = arrays
        if not transport.all_finite(arrays) or not math.isfinite(header["loss"]):
            return self._refuse_push(header, "non_finite", "gradient or loss not finite")
        if self.outliers.is_outlier(abs(header["loss"])):
            return self._refuse_push(header, "outlier", f"loss {header['loss']:.4g}")
        if not self.apply(worker, grads, header["version"]):
            return self._refuse_push(header, "non_finite_update", "the update was not finite")
        self.counters.accepted(worker, staleness)
        return self._reply(header, "ack", accepted=True, reason=None)

    def _refuse_push(self, header: dict, reason: str, message: str) -> list:
        self.counters.refused(reason, header["worker"], authenticated=True)
        return self._reply(header, "ack", accepted=False, reason=reason)

    def apply(self, worker: int, grads: np.ndarray, base_version: int | None = None) -> bool:
        """Apply one accepted gradient (whole or the worker's shard) and bump the version.

        With DC-ASGD the stale params are those `worker` was sent at `base_version` (None:
        its latest pull); without a record of them the gradient is not compensated. Returns
        False, and changes nothing, when the update would make the params or the optimizer
        state non-finite.
        """
        stale = self.params
        held = self.pulled.get(worker) if self.uses_dc_asgd else None
        if held:
            if base_version is None:
                base_version = max(held)
            stale = held.get(base_version, self.params)
            # A bundle's base versions never decrease: older records are no longer needed.
            for version in [v for v in held if v < base_version]:
                del held[version]
        indices = self._device_shards[worker]
        # device_put uses an aligned host buffer in place, where jnp.asarray would copy it.
        grads = jax.device_put(np.asarray(grads, np.float32))
        self.state, finite = self._apply(
            self.state, grads, indices, stale if self.uses_dc_asgd else None
        )
        return finite

    # ---- statistics ----------------------------------------------------------------------

    def stats(self) -> dict:
        """The statistics of ps.json and the stats reply (`ServerStats.snapshot`)."""
        return self.counters.snapshot(
            self.version,
            stopped_workers=sorted(self.stopped_workers),
            checkpointed_version=self.checkpointed_version,
            num_workers=self.num_workers,
            num_params=self.num_params,
            server_shard=self.shard,
            server_shards=self.layout.num_shards,
            shard_factor=self.config.shard_factor,
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
        """Every bundle has said it is done."""
        return len(self.stopped_workers) >= self.num_workers

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
        number. A checkpoint of another shard or shard layout is refused (CheckpointError)
        before anything changes; one that predates shards is one unsharded server's."""
        layout = meta.get("shard_layout", [0, self.total_params])
        shard = meta.get("server_shard", 0)
        if layout != list(self.layout.bounds) or shard != self.shard:
            raise CheckpointError(
                f"the checkpoint holds shard {shard} of layout {layout}, this process is shard "
                f"{self.shard} of {list(self.layout.bounds)}; resume with the same "
                "--server-shards, or use another --run-dir"
            )
        self.params = jnp.asarray(state["params"], jnp.float32)
        self.opt_state = state["opt_state"]
        self.version = int(meta["version"])
        self.counters.load(meta)
        self.last_seq = {int(w): int(s) for w, s in meta.get("last_seq", {}).items()}
        stopped = {int(w) for w in meta.get("stopped_workers", [])}
        # Every worker had stopped: the run had ended, and this start continues it with
        # bundles that will say hello. Otherwise those that stopped will not stop again.
        self.stopped_workers = set() if len(stopped) >= self.num_workers else stopped
        self.outliers.load(meta.get("outliers"))
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
        only ever names a checkpoint that exists.
        """
        self.checkpointed_at = self.clock()
        if not self._unsaved():
            return False
        if not bool(jnp.isfinite(self.params).all()):
            log.warning(f"version {self.version} has non-finite params; not checkpointed")
            return False
        state, meta = self.checkpoint_state()
        try:
            saved = checkpointer.save(
                self.version, state, meta, replace=self.version == self.checkpointed_version
            )
        except Exception as error:  # a full disk must not stop the server
            log.warning(f"checkpoint {self.version} failed: {type(error).__name__}: {error}")
            return False
        if not saved:
            log.warning(f"checkpoint {self.version} was not written (a newer one is on disk)")
            return False
        self.checkpointed_version = self.version
        self._checkpointed_stops = frozenset(self.stopped_workers)
        return True

    def checkpoint_due(self) -> bool:
        """Every `checkpoint_every_updates` updates or `checkpoint_every_seconds` seconds,
        and as soon as a worker has stopped (a restarted server must know it)."""
        if not self._unsaved():
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
    checkpoints are written when due and once at the end.
    """
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    next_stats = 0.0
    while not should_stop() and not server.all_workers_stopped():
        if poller.poll(timeout=100):
            _answer(server, socket, time.monotonic() + turn_seconds)
        if checkpointer is not None and server.checkpoint_due():
            server.save_checkpoint(checkpointer)
        if server.clock() >= next_stats:
            server.write_stats(address)
            next_stats = server.clock() + server.config.stats_every_seconds
    if checkpointer is not None:
        server.save_checkpoint(checkpointer)
    server.write_stats(address)


def _answer(server: ParameterServer, socket: zmq.Socket, turn_ends: float) -> None:
    """Receive, handle and reply to waiting messages until none is left or `turn_ends`
    (monotonic time) has passed; at least one message when one is waiting."""
    while True:
        try:
            routing_id, frames = transport.recv(
                socket, zmq.NOBLOCK, max_frames=MAX_REQUEST_FRAMES, max_bytes=server.max_bytes
            )
        except zmq.Again:
            return
        except transport.OversizedMessage as error:
            routing_id = error.routing_id
            reply = server.reject(error.reason, None, error.message, authenticated=False)
        else:
            reply = server.handle(frames)
        transport.send(socket, reply, routing_id, copy=False)
        if time.monotonic() >= turn_ends:
            return


def max_message_bytes(config: Config, num_params: int) -> int:
    """The message size limit of both ends: `max_message_mb`, or when it is 0 the largest
    legitimate message (the flat float32 params and a header) plus headroom."""
    if config.max_message_mb:
        return config.max_message_mb * 1024 * 1024
    return transport.message_limit(4 * num_params)
