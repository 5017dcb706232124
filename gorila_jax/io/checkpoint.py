"""Checkpoints of a learner's whole state (the parameter server's, or a single process's),
with orbax.

A checkpoint is one orbax step directory under RUN_DIR/checkpoints/<step>/ (the server's
version, the single process's update count) holding the arrays (saved by orbax's standard
pytree handler: tensorstore files, no pickle) and a JSON document (counters, the resolved
config and the fingerprint of its training settings, see `run_meta`). orbax writes into a
temporary directory and renames it when complete, so a checkpoint is atomic; the manager
keeps the last `keep`. `save` says whether it wrote anything, so a caller never reports a
checkpoint that orbax refused.

A step written again (`save(..., replace=True)`: the same version with changed counters)
never removes what it replaces before the replacement is complete and synced: it is written
aside, in RUN_DIR/checkpoints.replacing/, and then exchanged with the old one in one rename
(Linux's renameat2 RENAME_EXCHANGE; elsewhere the old one is moved aside first, and the
next Checkpointer finishes a swap that a crash interrupted). A full disk or a kill during
the write leaves the replaced checkpoint as it was.

Restoring checks, before anything is used, that the checkpoint was made by the same run:
the same training settings (`check_same_run`: every config field but
`config.RESUME_SAFE_FIELDS`) and whatever else the caller expects (the parameter tree's
fingerprint); a mismatch is one line naming the differing fields unless forced. A truncated
or corrupted checkpoint falls back to the previous one with a warning, and the damaged
newer ones are moved to RUN_DIR/damaged_checkpoints/ so that the steps they held can be
written again; when none is readable the error says so in one line.

orbax is imported by the functions that read or write a checkpoint, not with this module:
its import takes about 3 s of CPU, and the processes that import this module only for
`CheckpointError` or `run_meta` (the launcher, every bundle and aggregator) never write
or read one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax

from gorila_jax.core.config import (
    Config,
    completed,
    fingerprint,
    optimizer_state_shape,
    resume_differences,
    to_dict,
)
from gorila_jax.io.files import sync_directory, sync_tree

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
STAGING_DIR = "checkpoints.replacing"  # a replacement is written here, then swapped in
ASIDE_SUFFIX = ".replaced"  # a replaced step moved aside (where no exchange is possible)
MAX_NAMED_DIFFERENCES = 6
# The layout of a checkpoint's JSON document (`run_meta` and what each role adds); a
# checkpoint of another version is refused in one line (`check_format`).
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


class Restored(NamedTuple):
    """What a checkpoint gives back."""

    version: int
    state: Any
    meta: dict


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / CHECKPOINT_DIR


def run_meta(config: Config) -> dict:
    """What every checkpoint's JSON document records about the run that made it: the
    format version, the resolved config and the fingerprint of its training settings (see
    `check_same_run`)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": to_dict(config),
        "config_fingerprint": fingerprint(config),
    }


def check_format(meta: Mapping, where: str) -> None:
    """Refuse (one-line CheckpointError) a checkpoint of another format version than this
    code reads. Checkpoints written before the field existed are of version 1, and say so
    by their config (every one of them records it)."""
    version = meta.get("format_version", 1)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{where} records no config: it predates the checkpoint format this gorila_jax "
            f"reads ({CHECKPOINT_FORMAT_VERSION}); use another --run-dir"
        )
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{where} is of checkpoint format {version!r}; this gorila_jax reads format "
            f"{CHECKPOINT_FORMAT_VERSION}: resume it with the version that wrote it, or use "
            "another --run-dir"
        )


def settings_differences(meta: Mapping, config: Config) -> list[str]:
    """The training settings in which a checkpoint's meta differs from `config`, as
    "field saved -> now" strings (empty when it is the same run).

    The saved config (`run_meta`; `check_format` has made sure it is there) is compared
    field by field.
    """
    return resume_differences(meta["config"], config)


def _listed(differences: list[str]) -> str:
    named = differences[:MAX_NAMED_DIFFERENCES]
    more = len(differences) - len(named)
    return ", ".join(named) + (f" and {more} more" if more else "")


def check_same_run(meta: Mapping, config: Config, where: str) -> None:
    """Refuse (one-line CheckpointError) a checkpoint whose training settings differ from
    `config`'s, naming the fields; `where` names the checkpoint in the message."""
    differences = settings_differences(meta, config)
    if differences:
        raise CheckpointError(
            f"{where} was trained with other settings ({_listed(differences)}); resume it "
            "with --force-resume, or start afresh with another --run-dir"
        )


NETWORK_FIELDS = frozenset({"env_id", "mlp_hidden", "dueling"})
"""The settings that shape the Q-network (with the environment's action count)."""


def _mismatches(meta: Mapping, expect: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, wanted) for each meta value in `expect` that the checkpoint does not match."""
    return [
        (key, meta.get(key), wanted) for key, wanted in expect.items() if meta.get(key) != wanted
    ]


def check_same_network(
    meta: Mapping, config: Config, where: str, expect: Mapping[str, Any]
) -> None:
    """Refuse (one-line CheckpointError), --force-resume or not, a checkpoint of another
    network: one whose settings that shape the network (`NETWORK_FIELDS`) differ from
    `config`'s, or whose meta values in `expect` (the server's parameter tree fingerprint)
    differ. A forced resume may carry a checkpoint over to another schedule, never into
    arrays of another shape (orbax would restore the saved shapes whatever the template,
    and the run would crash in its first forward pass, or call the checkpoint damaged)."""
    differences = [
        difference
        for difference in settings_differences(meta, config)
        if difference.split(" ", 1)[0] in NETWORK_FIELDS
    ] + [f"{key} {saved!r} -> {wanted!r}" for key, saved, wanted in _mismatches(meta, expect)]
    if differences:
        raise CheckpointError(
            f"{where} was made for another network ({_listed(differences)}); a run resumes "
            "only the network it trained, even with --force-resume: use another --run-dir"
        )


def check_same_optimizer_state(meta: Mapping, config: Config, where: str) -> None:
    """Refuse (one-line CheckpointError), --force-resume or not, a checkpoint whose
    optimizer state has another structure than `config`'s optimizer keeps (another base
    optimizer, clipping, DC-ASGD or learning-rate decay switched on or off): orbax could
    not restore it into this run's state, and the checkpoint would be called damaged."""
    saved = optimizer_state_shape(completed(meta["config"]))
    wanted = optimizer_state_shape(to_dict(config))
    differences = [
        f"{key} {saved[key]!r} -> {wanted[key]!r}" for key in saved if saved[key] != wanted[key]
    ]
    if differences:
        raise CheckpointError(
            f"{where} holds the state of another optimizer ({_listed(differences)}); a run "
            "resumes only with the optimizer state it saved, even with --force-resume: "
            "change the setting back, or use another --run-dir"
        )


def _warn_forced(meta: Mapping, config: Config, where: str) -> None:
    """Put on record, as one warning, what a --force-resume carries over: the training
    settings in which the checkpoint differs from this run (silent when none differ), so a
    changed schedule shows in the run's log."""
    differences = settings_differences(meta, config)
    if differences:
        log.warning(
            f"--force-resume: {where} was made with other settings ({_listed(differences)})"
        )


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run directory holds at least one complete checkpoint."""
    directory = checkpoint_dir(run_dir)
    if directory.is_dir() and any(
        _complete(step) for step in directory.iterdir() if step.name.isdigit()
    ):
        return True
    # A swap interrupted between its two renames (finished by the next Checkpointer).
    staging = Path(run_dir) / STAGING_DIR
    return staging.is_dir() and any(
        _complete(step) for step in staging.iterdir() if step.name.endswith(ASIDE_SUFFIX)
    )


def newest_checkpoint_version(run_dir: Path) -> int | None:
    """The version (step) of the newest complete checkpoint in the run directory, read from
    the directory names only (no orbax): for comparing shards' checkpoints."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    steps = [int(s.name) for s in directory.iterdir() if s.name.isdigit() and _complete(s)]
    return max(steps, default=None)


def _complete(step: Path) -> bool:
    """Whether a step directory holds a finished orbax checkpoint."""
    return (step / "commit_success.txt").exists() or (step / "_CHECKPOINT_METADATA").exists()


class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs, one per step."""

    def __init__(self, run_dir: Path, *, keep: int):
        logging.getLogger("absl").setLevel(logging.WARNING)
        self.directory = checkpoint_dir(run_dir).absolute()
        self.damaged_directory = Path(run_dir).absolute() / DAMAGED_DIR
        self.staging_directory = Path(run_dir).absolute() / STAGING_DIR
        self._finish_interrupted_replace()
        self._manager = _manager(self.directory, keep)

    def save(self, step: int, state: Any, meta: dict, *, replace: bool = False) -> bool:
        """Write a checkpoint for `step`, blocking until it is complete on disk; True when
        one was written. A step already saved is left alone, or with `replace` (the newest
        step only: the same version with changed counters) written again: the replacement
        is complete and synced before it takes the old one's place, so a failure or a kill
        at any moment leaves the step restorable, old or new. orbax writes no step at or
        below the newest on disk: then this returns False."""
        if step in self._manager.all_steps():
            if not replace or step != self._manager.latest_step():
                return False
            return self._replace(step, state, meta)
        saved = self._manager.save(step, args=_save_args(state, meta))
        self._manager.wait_until_finished()
        return bool(saved)

    def _replace(self, step: int, state: Any, meta: dict) -> bool:
        """Write `step` aside (RUN_DIR/checkpoints.replacing/<step>), sync it, then swap it
        with the saved one and remove the old. Raises (the old one untouched) if the write
        fails."""
        staging = self.staging_directory
        shutil.rmtree(staging, ignore_errors=True)
        # Each attempt writes in a directory of its own: a write that a failed attempt left
        # in flight cannot land in a later one.
        attempt = staging / f"attempt-{os.getpid()}-{time.monotonic_ns()}"
        written = attempt / str(step)
        fresh = staging / str(step)
        try:
            manager = _manager(attempt, 1)
            try:
                saved = manager.save(step, args=_save_args(state, meta))
                manager.wait_until_finished()
            finally:
                manager.close()
            if not saved or not _complete(written):
                shutil.rmtree(staging, ignore_errors=True)
                return False
            sync_tree(written)
            os.rename(written, fresh)
            sync_directory(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        current = self.directory / str(step)
        if not _exchange(fresh, current):
            # No atomic exchange here: move the old one aside, then the new one in; the next
            # Checkpointer finishes a swap that a crash cut between the two.
            os.rename(current, staging / f"{step}{ASIDE_SUFFIX}")
            sync_directory(staging)
            os.rename(fresh, current)
        sync_directory(self.directory)
        sync_directory(staging)
        shutil.rmtree(staging, ignore_errors=True)  # now the replaced checkpoint
        self._manager.reload()
        return True

    def _finish_interrupted_replace(self) -> None:
        """Finish a replace that a crash interrupted between its two renames: a step moved
        aside whose place is empty gets its complete replacement, else itself, back. What
        else the staging directory holds (an unfinished replacement) is removed."""
        staging = self.staging_directory
        if not staging.is_dir():
            return
        for aside in sorted(staging.iterdir()):
            if not aside.name.endswith(ASIDE_SUFFIX):
                continue
            step = aside.name[: -len(ASIDE_SUFFIX)]
            target = self.directory / step
            if target.exists():
                continue
            fresh = staging / step
            source, which = (fresh, "its replacement") if _complete(fresh) else (aside, "itself")
            os.rename(source, target)
            sync_directory(self.directory)
            log.warning(f"checkpoint {step}: finished a replace interrupted by a crash ({which})")
        shutil.rmtree(staging, ignore_errors=True)

    def versions(self) -> list[int]:
        """Saved versions, oldest first."""
        return sorted(self._manager.all_steps())

    def restore_latest(
        self,
        template: Any,
        *,
        config: Config,
        expect: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> Restored | None:
        """The newest usable checkpoint (None if there is none).

        It must have been made by the same run: the same training settings as `config`
        (`check_same_run`) and the meta values in `expect` (e.g. the parameter tree's
        fingerprint); a mismatch is a CheckpointError unless `force`. Unreadable
        checkpoints are skipped with a warning; when an older one is used, the skipped
        ones are moved to RUN_DIR/damaged_checkpoints/ so that later saves can reuse
        their steps.
        """
        import orbax.checkpoint as ocp

        versions = self.versions()
        if not versions:
            return None
        damaged = []
        for version in reversed(versions):
            where = f"checkpoint {version} in {self.directory}"
            try:
                meta = self._manager.restore(
                    version, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as error:  # orbax/tensorstore raise many types on bad files
                log.warning(
                    f"checkpoint {version} is unreadable ({_first_line(error)}); trying older"
                )
                damaged.append(version)
                continue
            if not isinstance(meta, dict):
                log.warning(f"checkpoint {version} has no metadata; trying older")
                damaged.append(version)
                continue
            check_format(meta, where)
            check_same_network(meta, config, where, expect or {})
            check_same_optimizer_state(meta, config, where)
            if force:
                _warn_forced(meta, config, where)
            else:
                check_same_run(meta, config, where)
            try:
                state = self._manager.restore(
                    version,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(template)),
                )["state"]
            except Exception as error:
                log.warning(
                    f"checkpoint {version} is unreadable ({_first_line(error)}); trying older"
                )
                damaged.append(version)
                continue
            self._move_aside(damaged)
            return Restored(version, state, meta)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (all {len(versions)} are damaged); "
            "move the directory away to start afresh"
        )

    def _move_aside(self, steps: list[int]) -> None:
        """Move damaged step directories out of the manager's sight (kept for a look)."""
        if not steps:
            return
        self.damaged_directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            target = self.damaged_directory / f"{step}-{stamp}"
            (self.directory / str(step)).rename(target)
            log.warning(f"moved damaged checkpoint {step} to {target}")
        self._manager.reload()

    def close(self) -> None:
        """Finish pending writes."""
        self._manager.wait_until_finished()
        self._manager.close()


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    """An orbax manager of `directory` keeping `keep` steps, used by this process alone.

    In a multi-process jax program (a sync run, whose process 0 alone writes the learner's
    checkpoints) orbax is told so: by default it would wait at its barriers for processes
    that never call it.
    """
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.CheckpointManager(directory, options=_options(keep))
    directory.mkdir(parents=True, exist_ok=True)  # orbax creates none for a subset
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.CheckpointManager(
        directory, options=_options(keep, create=False, multiprocessing=alone)
    )


def _options(
    keep: int,
    *,
    create: bool = True,
    multiprocessing: ocp.options.MultiprocessingOptions | None = None,
) -> ocp.CheckpointManagerOptions:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=False,
        multiprocessing_options=multiprocessing or ocp.options.MultiprocessingOptions(),
    )


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or the filesystem cannot, having changed nothing."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    path, directory = ctypes.c_char_p, ctypes.c_int
    renameat2.argtypes = [directory, path, directory, path, ctypes.c_uint]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]
