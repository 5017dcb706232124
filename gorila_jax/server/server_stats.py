"""A parameter server's statistics (`ServerStats`), where its files go, and RUN_DIR/ps.json
of a server split in shards.

`ServerStats` holds the counters of one server process, apart from its protocol state:
rejections by reason, refusals of requests without their worker's credential
("unauthenticated"), the staleness histogram of accepted pushes, per bundle (`workers`) its
hellos, pulls, accepted and rejected pushes and the last version it was sent, the frames
each bundle reported, events ("bundle_rejoined", "resumed") and the update rate. The server
tells it what happened (`refused`, `accepted`, `pulled`, `hello`, `frames_reported`); it
makes the statistics (`snapshot`: ps.json), writes them (`write`: ps.json and TensorBoard)
and gives and takes its part of a checkpoint's meta (`state`, `load`).

One unsharded server (`server_shards` 1) keeps the run directory's historical layout: its
checkpoints in RUN_DIR/checkpoints, its statistics in RUN_DIR/ps.json, TensorBoard in
RUN_DIR/server. Shard k of S > 1 keeps the same files under RUN_DIR/shard{k}/, and each
shard also writes RUN_DIR/ps.json when every shard's file is there: the whole server's
figures combined from every shard's ps.json (`combine`), so that ps.json means the same
whatever the shard count, plus a `shards` list holding each shard's own figures. Shards
never talk to each other; a shard only reads the others' files, as JSON, checked, and
skips any it cannot use. On hosts without a shared run directory, each shard's ps.json
stays in its own host's RUN_DIR/shard{k}/; `read_run_stats` combines them once collected.

How the figures combine:
- `version`, `updates` and `updates_per_second` are the mean over shards: every accepted
  push moves each shard it reaches by one version, so with one shard this is the server's
  count, and the target network of every bundle is refreshed on it (see bundle.client);
- `rejections`, `staleness_histogram`, `events` and `unauthenticated` are summed: each
  shard judges every push it receives on its own;
- per bundle (`workers`), each counter is the largest over shards (a push reaches every
  shard holding part of it, so this is the number of pushes that reached the server);
- `frames` (reported by the bundles with every push) is the largest over shards,
  `stopped_workers` those stopped at every shard, `checkpointed_version` the lowest.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gorila_jax.io.files import write_atomically

SUMMED = ("rejections", "staleness_histogram", "events", "unauthenticated")
SHARD_STATS = "ps.json"
STALENESS_BINS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_REPORTED_FRAMES = 2**53


def staleness_bin(staleness: int) -> str:
    """Histogram label of a staleness value: "0", "1", "2-3", "4-7", ..., "256+"."""
    for low, high in itertools.pairwise(STALENESS_BINS):
        if staleness < high:
            return str(low) if high - low == 1 else f"{low}-{high - 1}"
    return f"{STALENESS_BINS[-1]}+"


class ServerStats:
    """The counters of one server process, its statistics and the files they go to."""

    def __init__(self, clock: Callable[[], float], started: float):
        self.clock = clock
        self.started = started
        self.rejections: Counter[str] = Counter()
        self.unauthenticated: Counter[str] = Counter()
        self.staleness: Counter[str] = Counter()
        self.workers: dict[int, Counter[str]] = defaultdict(Counter)
        self.frames: dict[int, int] = {}
        self.events: Counter[str] = Counter()
        self.updates_per_second = 0.0
        self._rate_window: tuple[float, int] = (started, 0)
        # Earlier sittings of the run (from the checkpoint): their running time, and the
        # version this sitting started from.
        self.earlier_seconds: float | None = 0.0  # None: unknown (an older checkpoint)
        self.sitting_start_version = 0
        self._tensorboard = None

    # ---- what happened -------------------------------------------------------------------

    def refused(self, reason: str, worker: int | None, *, authenticated: bool) -> None:
        """A request refused for `reason`: counted against `worker` (None: a worker the
        server does not have) when the request presented its worker's credential, else under
        "unauthenticated", whatever worker it claims."""
        self.rejections[reason] += 1
        if not authenticated:
            self.unauthenticated["rejected"] += 1
        elif worker is not None:
            self.workers[worker]["rejected"] += 1

    def accepted(self, worker: int, staleness: int) -> None:
        """A push applied, computed on params `staleness` versions old."""
        self.staleness[staleness_bin(staleness)] += 1
        self.workers[worker]["accepted"] += 1

    def hello(self, worker: int) -> None:
        """A bundle said hello; a second hello is a bundle that rejoined."""
        if self.workers[worker]["hellos"] > 0:
            self.events["bundle_rejoined"] += 1
        self.workers[worker]["hellos"] += 1

    def pulled(self, worker: int, version: int) -> None:
        """A bundle was sent the params of `version`."""
        self.workers[worker]["pulls"] += 1
        self.workers[worker]["last_version_pulled"] = version

    def frames_reported(self, worker: int, frames: int) -> None:
        """A bundle's frame count (with its pushes), clamped so that a bogus count cannot
        overflow the statistics' msgpack integers."""
        self.frames[worker] = min(frames, MAX_REPORTED_FRAMES)

    # ---- statistics ----------------------------------------------------------------------

    def running_seconds(self) -> float | None:
        """How long the run's server has been running: every sitting's time summed (pauses
        between sittings not counted); None when an earlier sitting's is unknown."""
        if self.earlier_seconds is None:
            return None
        return self.earlier_seconds + (self.clock() - self.started)

    def snapshot(self, version: int, *, stopped_workers: list[int], **fixed: Any) -> dict:
        """The statistics of the stats reply and ps.json (plain msgpack/JSON values) at
        `version`, the `fixed` fields (the server's settings) last.

        Three update rates, each labelled by what it divides: `updates_per_second_run`,
        all of the run's updates over its running time (`running_seconds`, every sitting
        summed); `updates_per_second_sitting`, this sitting's updates over its uptime
        (`uptime_seconds`); `updates_per_second`, the last window of at least a second
        between calls."""
        now = self.clock()
        since, at_version = self._rate_window
        if now - since >= 1.0:
            self.updates_per_second = (version - at_version) / (now - since)
            self._rate_window = (now, version)
        uptime = now - self.started
        running = self.running_seconds()
        sitting_updates = version - self.sitting_start_version
        return {
            "version": version,
            "updates": version,
            "updates_per_second": round(self.updates_per_second, 3),
            "updates_per_second_run": (
                None if running is None else round(version / running, 3) if running > 0 else 0.0
            ),
            "updates_per_second_sitting": round(sitting_updates / uptime, 3) if uptime > 0 else 0.0,
            "uptime_seconds": round(uptime, 3),
            "running_seconds": None if running is None else round(running, 3),
            "sitting_updates": sitting_updates,
            "staleness_histogram": dict(self.staleness),
            "rejections": dict(self.rejections),
            "workers": {str(w): dict(c) for w, c in sorted(self.workers.items())},
            "unauthenticated": dict(self.unauthenticated),
            "stopped_workers": stopped_workers,
            "frames": sum(self.frames.values()),
            "events": dict(self.events),
            **fixed,
        }

    def write(
        self, stats: dict, *, address: str, own_dir: Path, run_dir: Path, shard: int, shards: int
    ) -> None:
        """Write `stats` (a `snapshot`) and `address` atomically to own_dir/ps.json, and the
        same figures to TensorBoard (own_dir/server) against their version. A shard of a
        sharded server also writes RUN_DIR/ps.json, the whole server's figures (`combine`),
        once every shard's own file is there: the last shard to stop leaves the final
        figures, with no shard waiting for another."""
        stats = {"address": address, **stats}
        write_atomically(own_dir / SHARD_STATS, json.dumps(stats, indent=1))
        if shards > 1:
            found = read_shard_stats(run_dir, shards)
            if found is not None:
                write_atomically(Path(run_dir) / SHARD_STATS, json.dumps(combine(found), indent=1))
        if self._tensorboard is None:
            from gorila_jax.io.metrics import open_tensorboard

            self._tensorboard = open_tensorboard(own_dir / "server") or False
        if self._tensorboard:
            version = stats["version"]
            board = self._tensorboard
            board.add_scalar("server/updates_per_second", stats["updates_per_second"], version)
            board.add_scalar("server/frames", stats["frames"], version)
            for reason, count in stats["rejections"].items():
                board.add_scalar(f"server/rejected/{reason}", count, version)
            for label, count in stats["staleness_histogram"].items():
                board.add_scalar(f"server/staleness/{label}", count, version)

    # ---- checkpoints ---------------------------------------------------------------------

    def state(self) -> dict:
        """The counters as JSON values, for a checkpoint's meta."""
        return {
            "workers": {str(w): dict(c) for w, c in self.workers.items()},
            "frames": {str(w): f for w, f in self.frames.items()},
            "rejections": dict(self.rejections),
            "unauthenticated": dict(self.unauthenticated),
            "staleness_histogram": dict(self.staleness),
            "events": dict(self.events),
            "running_seconds": self.running_seconds(),
        }

    def load(self, meta: dict) -> None:
        """Continue the counters of a checkpoint's meta (`state()`'s keys and its version;
        "unauthenticated" may be missing), counting the event "resumed"; the update rate is
        measured afresh from now."""
        self.workers = defaultdict(
            Counter, {int(w): Counter(c) for w, c in meta["workers"].items()}
        )
        self.frames = {int(w): int(f) for w, f in meta["frames"].items()}
        self.rejections = Counter(meta["rejections"])
        self.unauthenticated = Counter(meta.get("unauthenticated", {}))
        self.staleness = Counter(meta["staleness_histogram"])
        self.events = Counter(meta["events"])
        self.events["resumed"] += 1
        self._rate_window = (self.clock(), int(meta["version"]))
        self.sitting_start_version = int(meta["version"])
        # A checkpoint from before running time was kept: the run's running time, and so
        # its rate, stay unknown (None, null in ps.json) rather than wrong.
        running = meta.get("running_seconds")
        known = isinstance(running, int | float) and math.isfinite(running) and running >= 0
        self.earlier_seconds = float(running) if known else None


def server_dir(run_dir: Path, shard: int, shards: int) -> Path:
    """The directory of one server process's files (checkpoints, ps.json, TensorBoard)."""
    return Path(run_dir) if shards == 1 else Path(run_dir) / f"shard{shard}"


def _counter(value: Any) -> Counter:
    """The finite numbers of a dict of counters (anything else is skipped)."""
    if not isinstance(value, dict):
        return Counter()
    return Counter(
        {
            str(k): int(v)
            for k, v in value.items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
    )


def _number(stats: dict, key: str) -> float:
    value = stats.get(key, 0)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def combine(shards: list[dict]) -> dict:
    """The whole server's statistics from each shard's (see the module docstring)."""
    if not shards:
        raise ValueError("no shard statistics to combine")
    count = len(shards)
    combined: dict[str, Any] = {
        "version": sum(int(_number(s, "version")) for s in shards) // count,
        "updates_per_second": round(
            sum(_number(s, "updates_per_second") for s in shards) / count, 3
        ),
        "uptime_seconds": max(_number(s, "uptime_seconds") for s in shards),
    }
    for key in ("running_seconds", "updates_per_second_run"):  # unknown in any: unknown
        known = [s.get(key) for s in shards]
        if all(isinstance(v, int | float) and math.isfinite(v) for v in known):
            combined[key] = max(known) if key == "running_seconds" else round(sum(known) / count, 3)
        else:
            combined[key] = None
    combined["updates_per_second_sitting"] = round(
        sum(_number(s, "updates_per_second_sitting") for s in shards) / count, 3
    )
    combined["sitting_updates"] = sum(int(_number(s, "sitting_updates")) for s in shards) // count
    combined["updates"] = combined["version"]
    for key in SUMMED:
        total: Counter = Counter()
        for stats in shards:
            total.update(_counter(stats.get(key)))
        combined[key] = dict(total)
    workers: dict[str, Counter] = {}
    for stats in shards:
        listed = stats.get("workers")
        for worker, counters in (listed if isinstance(listed, dict) else {}).items():
            mine = workers.setdefault(str(worker), Counter())
            for name, value in _counter(counters).items():
                mine[name] = max(mine[name], value)
    combined["workers"] = {w: dict(c) for w, c in sorted(workers.items())}
    stopped = [
        {w for w in listed if type(w) is int} if isinstance(listed, list) else set()
        for listed in (s.get("stopped_workers") for s in shards)
    ]
    combined["stopped_workers"] = sorted(set.intersection(*stopped))
    combined["frames"] = int(max(_number(s, "frames") for s in shards))
    combined["checkpointed_version"] = int(min(_number(s, "checkpointed_version") for s in shards))
    first = shards[0]
    for key in ("num_workers", "gradient_part", "dc_asgd", "address"):
        if key in first:
            combined[key] = first[key]
    combined["num_params"] = int(sum(_number(s, "num_params") for s in shards))
    combined["server_shards"] = count
    combined["shards"] = shards
    return combined


def read_shard_stats(run_dir: Path, shards: int) -> list[dict] | None:
    """Every shard's ps.json under RUN_DIR/shard{k}/, or None while any is missing or is not
    a JSON object naming its shard and this shard count."""
    found = []
    for shard in range(shards):
        path = server_dir(run_dir, shard, shards) / SHARD_STATS
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(stats, dict)
            or stats.get("server_shard") != shard
            or stats.get("server_shards") != shards  # a leftover of another layout
        ):
            return None
        found.append(stats)
    return found


def read_run_stats(run_dir: Path) -> dict | None:
    """A run's server figures: combined from the shards' own ps.json files when they are
    all there (fresher than a RUN_DIR/ps.json written before the last shard stopped),
    else RUN_DIR/ps.json; None when neither can be read."""
    shard_files = sorted(Path(run_dir).glob(f"shard*/{SHARD_STATS}"))
    if shard_files:
        found = read_shard_stats(Path(run_dir), len(shard_files))
        if found is not None:
            return combine(found)
    try:
        stats = json.loads((Path(run_dir) / SHARD_STATS).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None
