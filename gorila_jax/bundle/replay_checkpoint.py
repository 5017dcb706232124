"""Checkpoints of a bundle's replay memory and counters, so a resumed bundle learns at once.

One checkpoint is one zip file, `DIR/replay-<frames>.zip`, holding each array of
`Replay.state()` as a `.npy` member (deflate level 1: Atari frames are mostly background and
shrink many times over, at a few hundred MB/s) and one `meta.json` member: the replay's
scalars (write position, sampling RNG, ...), the bundle's counters (frames, agent steps,
episodes, the policy's RNG key) and what the checkpoint was made for (a fingerprint of the
replay settings, the bundle count and the bundle's index).

Writing goes to a temporary file that is synced and then renamed, so a checkpoint on disk is
always complete; a write that fails (a full disk) removes its temporary file, keeps the
previous checkpoints and says so in one line. The last `keep` checkpoints are kept, and the
one a save names as `spare` (a single process's: the replay that pairs with its learner's
checkpoint on disk) whatever its age.

Loading never unpickles: arrays are read with `allow_pickle=False` and the metadata is JSON.
A damaged file (bad zip, bad CRC, missing member, wrong shape) is skipped for the previous
one with a warning; a checkpoint made for other replay settings or another bundle count is
refused with a warning. Either way the bundle goes on with an empty replay, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gorila_jax.bundle.loop import LoopCounters
from gorila_jax.core.config import Config
from gorila_jax.core.replay import Replay
from gorila_jax.io.files import atomic_writer

log = logging.getLogger(__name__)

REPLAY_DIR = "replay"
COMPRESS_LEVEL = 1
MAX_META_BYTES = 1 << 20  # the JSON header is a few hundred bytes
_NAME = re.compile(r"^replay-(\d{12})\.zip$")


class ReplayRestored(NamedTuple):
    """What a replay checkpoint gives back beside the replay it filled."""

    frames: int
    counters: LoopCounters
    path: Path
    extra: dict


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

    def save(
        self,
        replay: Replay,
        counters: LoopCounters,
        extra: dict | None = None,
        *,
        spare: int | None = None,
    ) -> Path | None:
        """Write a checkpoint at `counters.frames`; None (with one warning line) if it failed.

        `extra` (JSON-able) is stored beside the counters, e.g. the learner step a
        single-process checkpoint pairs with. Older checkpoints than the last `keep` are
        deleted, except the one made at `spare` frames (the replay of the learner checkpoint
        a resume would load).
        """
        arrays, scalars = replay.state()
        frames = int(counters.frames)
        meta = {
            "expect": self.expect,
            "replay": scalars,
            "counters": counters.to_dict(),
            "frames": frames,
            "extra": extra or {},
        }
        path = self.directory / f"replay-{frames:012d}.zip"
        start = time.perf_counter()
        try:
            with (
                atomic_writer(path, durable=True) as raw,
                zipfile.ZipFile(
                    raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL
                ) as archive,
            ):
                archive.writestr("meta.json", json.dumps(meta))
                for name, array in arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
        except OSError as error:
            previous = self.checkpoints()
            kept = previous[-1].name if previous else "none"
            log.warning(
                f"replay checkpoint {path.name} not written ({_first_line(error)}); "
                f"the previous one is kept ({kept})"
            )
            return None
        self.last_seconds = time.perf_counter() - start
        self.last_bytes = path.stat().st_size
        self.last_raw_bytes = sum(array.nbytes for array in arrays.values())
        for old in self.checkpoints()[: -self.keep]:
            if spare is None or int(_NAME.match(old.name).group(1)) != spare:
                old.unlink(missing_ok=True)
        return path

    def restore(self, replay: Replay, *, frames: int | None = None) -> ReplayRestored | None:
        """Fill `replay` from the newest usable checkpoint; None (replay empty) if none is.

        With `frames`, only a checkpoint made at exactly that frame count is usable (a
        single process pairs its replay with its learner's checkpoint); newer ones are set
        aside. A damaged file is set aside for an older one; one made for other settings
        stops the search (older ones were made for the same settings) and every file is set
        aside. Set aside means moved into `refused/` beside them, kept for inspection but
        out of the way of later saves. Every refusal is one warning line; whatever happens,
        `replay` ends either restored or empty, never half-loaded.
        """
        for stale in self.directory.glob("*.tmp") if self.directory.is_dir() else ():
            stale.unlink(missing_ok=True)  # left by a process killed while writing
        candidates = list(reversed(self.checkpoints()))
        for at, path in enumerate(candidates):
            saved_frames = int(_NAME.match(path.name).group(1))
            if frames is not None and saved_frames > frames:
                self._set_aside(path, f"newer than the learner's checkpoint ({frames:,} frames)")
                continue
            if frames is not None and saved_frames < frames:
                break  # older than the learner: none of the rest pairs with it either
            try:
                restored = self._load(path, replay)
            except _Foreign as foreign:
                log.warning(
                    f"replay checkpoint {path} was made for another run ({foreign} differ); "
                    "starting with an empty replay"
                )
                for other in candidates[at:]:
                    self._set_aside(other, None)
                return None
            except Exception as error:  # a damaged file can raise almost anything
                replay.reset()
                self._set_aside(path, f"damaged ({_first_line(error)})")
                continue
            return restored
        if frames is not None and self.checkpoints():
            log.warning(
                f"no replay checkpoint in {self.directory} pairs with the learner's "
                f"({frames:,} frames); starting with an empty replay"
            )
        elif candidates:
            log.warning(
                f"no usable replay checkpoint in {self.directory}; starting with an empty replay"
            )
        return None

    def _load(self, path: Path, replay: Replay) -> ReplayRestored:
        """Read one checkpoint into `replay`; _Foreign or any other exception if unusable."""
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("meta.json")
            if info.file_size > MAX_META_BYTES:
                raise ValueError(f"meta.json of {info.file_size:,} bytes")
            meta = json.loads(archive.read(info))
            if not isinstance(meta, dict) or not all(
                isinstance(meta.get(key), dict) for key in ("expect", "replay", "counters")
            ):
                raise ValueError("meta.json lacks expect, replay or counters")
            if meta["expect"] != self.expect:
                keys = set(self.expect) | set(meta["expect"])
                raise _Foreign(", ".join(sorted(
                    str(k) for k in keys if meta["expect"].get(k) != self.expect.get(k)
                )))  # fmt: skip
            counters = LoopCounters.from_dict(meta["counters"])
            targets, _ = replay.state()  # the replay's own storage: read straight into it
            for name, target in targets.items():
                if name == "priorities":
                    target = np.empty_like(target)
                    targets[name] = target
                with archive.open(f"{name}.npy") as member:
                    _read_array_into(member, target, name)
        replay.load_state(targets, meta["replay"])
        return ReplayRestored(counters.frames, counters, path, meta.get("extra") or {})

    def _set_aside(self, path: Path, reason: str | None) -> None:
        """Move a refused checkpoint into `refused/` (with a warning when `reason` is given)."""
        refused = self.directory / "refused"
        try:
            refused.mkdir(exist_ok=True)
            path.replace(refused / path.name)
            where = f"moved to {refused}"
        except OSError as error:
            where = f"could not be moved aside: {_first_line(error)}"
        if reason is not None:
            log.warning(f"replay checkpoint {path} is {reason}; {where}")


class _Foreign(Exception):
    """A checkpoint made for other replay settings or another bundle layout."""


def _read_array_into(member, target: np.ndarray, name: str) -> None:
    """Read one .npy member into `target`, refusing any header that does not describe
    exactly `target`'s shape and dtype before a byte of data is read (no pickle, no
    allocation from the file's say-so), and any data that is short or too long."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"{name}.npy has format version {version}")
    if shape != target.shape or dtype != target.dtype or (fortran and target.ndim > 1):
        expected = f"{target.shape} {target.dtype}"
        raise ValueError(f"{name}.npy holds {shape} {dtype}, expected {expected}")
    view = memoryview(target).cast("B")
    filled = 0
    while filled < len(view):
        count = member.readinto(view[filled:])
        if not count:
            raise ValueError(f"{name}.npy is truncated")
        filled += count
    if member.read(1):  # also makes zipfile check the member's CRC
        raise ValueError(f"{name}.npy has trailing bytes")


def restore_replay(
    config: Config, replay: Replay, *, bundle: int, bundles: int, frames: int | None = None
) -> tuple[ReplayCheckpointer | None, LoopCounters | None]:
    """The replay checkpointer of this bundle (None when off) and the counters to resume
    from (None when its replay starts empty); fills `replay` from the newest usable one
    (with `frames`, the one made at exactly that frame count)."""
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
    restored = checkpointer.restore(replay, frames=frames)
    if restored is None:
        return checkpointer, None
    resume = restored.counters
    log.info(
        f"resumed its replay from {restored.path.name}: {len(replay):,} transitions, "
        f"{resume.frames:,} frames, {resume.episodes:,} episodes"
    )
    return checkpointer, resume


def replay_saver(
    checkpointer: ReplayCheckpointer | None, replay: Replay
) -> Callable[..., Path | None] | None:
    """The loop's checkpoint callback: save the replay and counters, report size and time
    (an INFO record; the log format names the process); returns the file, None when it was
    not written. `extra` and `spare` are `ReplayCheckpointer.save`'s."""
    if checkpointer is None:
        return None

    def save(
        counters: LoopCounters, extra: dict | None = None, *, spare: int | None = None
    ) -> Path | None:
        path = checkpointer.save(replay, counters, extra, spare=spare)
        if path is not None:
            ratio = checkpointer.last_raw_bytes / max(checkpointer.last_bytes, 1)
            log.info(
                f"replay checkpoint {path.name}: {len(replay):,} transitions, "
                f"{checkpointer.last_raw_bytes / 1e6:,.0f} MB -> "
                f"{checkpointer.last_bytes / 1e6:,.1f} MB ({ratio:.0f}x) "
                f"in {checkpointer.last_seconds:.1f} s"
            )
        return path

    return save
