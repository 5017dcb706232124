"""Where a parameter server's files go, and RUN_DIR/ps.json of a server split in shards.

One unsharded server (`server_shards` 1) keeps the run directory's historical layout: its
checkpoints in RUN_DIR/checkpoints, its statistics in RUN_DIR/ps.json, TensorBoard in
RUN_DIR/server. Shard k of S > 1 keeps the same files under RUN_DIR/shard{k}/, and shard 0
also writes RUN_DIR/ps.json: the whole server's figures combined from every shard's
ps.json (`combine`), so that ps.json means the same whatever the shard count, plus a
`shards` list holding each shard's own figures. Shards never talk to each other; shard 0
only reads the others' files, as JSON, checked, and skips any it cannot use.

How the figures combine:
- `version`, `updates` and `updates_per_second` are the mean over shards: every accepted
  push moves each shard it reaches by one version, so with one shard this is the server's
  count, and the target network of every bundle is refreshed on it (see ps_client);
- `rejections`, `staleness_histogram`, `events` and `unauthenticated` are summed: each
  shard judges every push it receives on its own;
- per bundle (`workers`), each counter is the largest over shards (a push reaches every
  shard holding part of it, so this is the number of pushes that reached the server);
- `frames` (reported by the bundles with every push) is the largest over shards,
  `stopped_workers` those stopped at every shard, `checkpointed_version` the lowest.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

SUMMED = ("rejections", "staleness_histogram", "events", "unauthenticated")
SHARD_STATS = "ps.json"


def server_dir(run_dir: Path, shard: int, shards: int) -> Path:
    """The directory of one server process's files (checkpoints, ps.json, TensorBoard)."""
    return Path(run_dir) if shards == 1 else Path(run_dir) / f"shard{shard}"


def _counter(value: Any) -> Counter:
    if not isinstance(value, dict):
        return Counter()
    return Counter(
        {str(k): int(v) for k, v in value.items() if isinstance(v, int | float) and v == v}
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
    combined["updates"] = combined["version"]
    for key in SUMMED:
        total: Counter = Counter()
        for stats in shards:
            total.update(_counter(stats.get(key)))
        combined[key] = dict(total)
    workers: dict[str, Counter] = {}
    for stats in shards:
        for worker, counters in (stats.get("workers") or {}).items():
            mine = workers.setdefault(str(worker), Counter())
            for name, value in _counter(counters).items():
                mine[name] = max(mine[name], value)
    combined["workers"] = {w: dict(c) for w, c in sorted(workers.items())}
    stopped = [set(s.get("stopped_workers") or []) for s in shards]
    combined["stopped_workers"] = sorted(set.intersection(*stopped))
    combined["frames"] = int(max(_number(s, "frames") for s in shards))
    combined["checkpointed_version"] = int(min(_number(s, "checkpointed_version") for s in shards))
    first = shards[0]
    for key in ("num_workers", "shard_factor", "dc_asgd", "address"):
        if key in first:
            combined[key] = first[key]
    combined["num_params"] = int(sum(_number(s, "num_params") for s in shards))
    combined["server_shards"] = count
    combined["shards"] = shards
    return combined


def read_shard_stats(run_dir: Path, shards: int) -> list[dict] | None:
    """Every shard's ps.json under RUN_DIR/shard{k}/, or None while any is missing or is not
    a JSON object naming its shard."""
    found = []
    for shard in range(shards):
        path = server_dir(run_dir, shard, shards) / SHARD_STATS
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stats, dict) or stats.get("server_shard") != shard:
            return None
        found.append(stats)
    return found
