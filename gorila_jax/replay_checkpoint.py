"""Checkpoints of a bundle's replay memory and counters, so a resumed bundle learns at once.

One checkpoint is one zip file, `DIR/replay-<frames>.zip`, holding each array of
`Replay.state()` as a `.npy` member (deflate level 1: Atari frames are mostly background and
shrink many times over, at a few hundred MB/s) and one `meta.json` member: the replay's
scalars (write position, sampling RNG, ...), the bundle's counters (frames, agent steps,
episodes, the policy's RNG key) and what the checkpoint was made for (a fingerprint of the
replay settings, the bundle count and the bundle's index).

Writing goes to a temporary file that is synced and then renamed, so a checkpoint on disk is
always complete; a write that fails (a full disk) removes its temporary file, keeps the
previous checkpoints and says so in one line. The last `keep` checkpoints are kept.

Loading never unpickles: arrays are read with `allow_pickle=False` and the metadata is JSON.
A damaged file (bad zip, bad CRC, missing member, wrong shape) is skipped for the previous
one with a warning; a checkpoint made for other replay settings or another bundle count is
refused with a warning. Either way the bundle goes on with an empty replay, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gorila_jax.bundle import LoopCounters
from gorila_jax.config import Config
from gorila_jax.replay import Replay

REPLAY_DIR = "replay"
COMPRESS_LEVEL = 1
_NAME = re.compile(r"^replay-(\d{12})\.zip$")


class ReplayRestored(NamedTuple):
    """What a replay checkpoint gives back beside the replay it filled."""

    frames: int
    counters: dict
    path: Path


def replay_dir(run_dir: Path, bundle: int) -> Path:
    """Where bundle `bundle`'s replay checkpoints live (0 for a single-process run)."""
    name = "single" if bundle == 0 else f"bundle{bundle}"
    return Path(run_dir) / REPLAY_DIR / name


def replay_fingerprint(config: Config) -> str:
    """A short hash of the settings that decide what a replay holds and how it samples."""
    keys = (
        "env_id",
        "num_envs",
        "replay_capacity",
        "n_step",
        "gamma",
        "prioritized",
        "priority_alpha",
        "priority_eps",
        "noop_max",
        "episodic_life",
        "reward_clip",
        "max_episode_frames",
    )
    values = {key: getattr(config, key) for key in keys}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


class ReplayCheckpointer:
    """Saves and restores one bundle's replay and counters in `directory`."""

    def __init__(self, directory: Path, *, keep: int, expect: dict):
        """`expect` (JSON-able) is written into every checkpoint and must match on restore."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.expect = dict(expect)
        self.last_seconds = 0.0
        self.last_bytes = 0
        self.last_raw_bytes = 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def save(self, frames: int, replay: Replay, counters: dict) -> Path | None:
        """Write a checkpoint for `frames`; None (with one warning line) if it failed."""
        arrays, scalars = replay.state()
        meta = {"expect": self.expect, "replay": scalars, "counters": counters, "frames": frames}
        path = self.directory / f"replay-{int(frames):012d}.zip"
        tmp = path.with_name(path.name + ".tmp")
        start = time.perf_counter()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as raw:
                with zipfile.ZipFile(
                    raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL
                ) as archive:
                    archive.writestr("meta.json", json.dumps(meta))
                    for name, array in arrays.items():
                        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                            np.lib.format.write_array(member, array, allow_pickle=False)
                raw.flush()
                os.fsync(raw.fileno())
            tmp.replace(path)
            _sync_directory(self.directory)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            previous = self.checkpoints()
            kept = previous[-1].name if previous else "none"
            warn(f"replay checkpoint {path.name} not written ({_first_line(error)}); "
                 f"the previous one is kept ({kept})")  # fmt: skip
            return None
        self.last_seconds = time.perf_counter() - start
        self.last_bytes = path.stat().st_size
        self.last_raw_bytes = sum(array.nbytes for array in arrays.values())
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def restore(self, replay: Replay) -> ReplayRestored | None:
        """Fill `replay` from the newest usable checkpoint; None (replay empty) if none is.

        Damaged files are skipped for older ones; one made for other settings stops the
        search (older ones were made for the same settings). Every refusal is one warning.
        """
        for path in reversed(self.checkpoints()):
            try:
                meta, arrays = _read(path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
                warn(f"replay checkpoint {path} is damaged ({_first_line(error)}); trying older")
                continue
            if meta.get("expect") != self.expect:
                differing = sorted(
                    key
                    for key in set(self.expect) | set(meta.get("expect") or {})
                    if (meta.get("expect") or {}).get(key) != self.expect.get(key)
                )
                warn(f"replay checkpoint {path} was made for another run ({', '.join(differing)} "
                     "differ); starting with an empty replay")  # fmt: skip
                return None
            try:
                replay.load_state(arrays, meta["replay"])
            except (ValueError, KeyError, TypeError) as error:
                warn(f"replay checkpoint {path} is damaged ({_first_line(error)}); trying older")
                continue
            counters = meta.get("counters")
            frames = meta.get("frames")
            if not isinstance(counters, dict) or not isinstance(frames, int):
                replay.reset()
                warn(f"replay checkpoint {path} is damaged (no counters); trying older")
                continue
            return ReplayRestored(frames, counters, path)
        if self.checkpoints():
            warn(f"no usable replay checkpoint in {self.directory}; starting with an empty replay")
        return None


def restore_replay(
    config: Config, replay: Replay, *, bundle: int, bundles: int
) -> tuple[ReplayCheckpointer | None, LoopCounters | None]:
    """The replay checkpointer of this bundle (None when off) and the counters to resume
    from (None when its replay starts empty); fills `replay` from the newest usable one."""
    if not config.checkpoint_replay:
        return None, None
    checkpointer = ReplayCheckpointer(
        replay_dir(Path(config.run_dir), bundle),
        keep=config.checkpoint_keep,
        expect={
            "replay_fingerprint": replay_fingerprint(config),
            "bundles": bundles,
            "bundle": bundle,
        },
    )
    restored = checkpointer.restore(replay)
    if restored is None:
        return checkpointer, None
    try:
        resume = LoopCounters.from_dict(restored.counters)
    except ValueError as error:
        replay.reset()
        warn(f"replay checkpoint {restored.path} is damaged ({error}); starting empty")
        return checkpointer, None
    name = "single process" if bundle == 0 else f"bundle {bundle}"
    print(
        f"[{name}] resumed its replay from {restored.path.name}: {len(replay):,} transitions, "
        f"{resume.frames:,} frames, {resume.episodes:,} episodes",
        flush=True,
    )
    return checkpointer, resume


def replay_saver(
    checkpointer: ReplayCheckpointer | None, replay: Replay, prefix: str
) -> Callable[[LoopCounters], None] | None:
    """The loop's checkpoint callback: save the replay and counters, report size and time."""
    if checkpointer is None:
        return None

    def save(counters) -> None:
        path = checkpointer.save(counters.frames, replay, counters.to_dict())
        if path is not None:
            ratio = checkpointer.last_raw_bytes / max(checkpointer.last_bytes, 1)
            print(
                f"{prefix} replay checkpoint {path.name}: {len(replay):,} transitions, "
                f"{checkpointer.last_raw_bytes / 1e6:,.0f} MB -> "
                f"{checkpointer.last_bytes / 1e6:,.1f} MB ({ratio:.0f}x) "
                f"in {checkpointer.last_seconds:.1f} s",
                flush=True,
            )

    return save


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and arrays of one checkpoint file, CRCs checked, nothing unpickled."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("meta.json"))
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not a mapping")
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
                if member.read(1):
                    raise ValueError(f"{name} has trailing bytes")
            arrays[name[: -len(".npy")]] = array
    return meta, arrays


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
