"""Checkpoints of the parameter server's whole state, with orbax.

A checkpoint is one orbax step directory under RUN_DIR/checkpoints/<version>/ holding the
arrays (flat params and the optax state, saved by orbax's standard pytree handler:
tensorstore files, no pickle) and a JSON document (version, counters, per-bundle frames,
the config and its fingerprint, the parameter tree's fingerprint). orbax writes into a
temporary directory and renames it when complete, so a checkpoint is atomic; the manager
keeps the last `keep`.

Restoring checks, before anything is used, that the checkpoint was made for the same
network and optimizer (config fingerprint and tree fingerprint); a different one is refused
with a clear error unless forced. A truncated or corrupted checkpoint falls back to the
previous one with a warning; when none is readable the error says so in one line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


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


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run directory holds at least one complete checkpoint."""
    directory = checkpoint_dir(run_dir)
    return directory.is_dir() and any(
        (step / "commit_success.txt").exists() or (step / "_CHECKPOINT_METADATA").exists()
        for step in directory.iterdir()
        if step.name.isdigit()
    )


class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs, one per server version."""

    def __init__(self, run_dir: Path, *, keep: int):
        logging.getLogger("absl").setLevel(logging.WARNING)
        self.directory = checkpoint_dir(run_dir).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def save(self, version: int, state: Any, meta: dict) -> None:
        """Write a checkpoint for `version` (blocking until it is complete on disk)."""
        if version in self._manager.all_steps():
            return
        self._manager.save(
            version,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()

    def versions(self) -> list[int]:
        """Saved versions, oldest first."""
        return sorted(self._manager.all_steps())

    def restore_latest(
        self, template: Any, *, expect: dict[str, str], force: bool = False
    ) -> Restored | None:
        """The newest usable checkpoint (None if there is none).

        `expect` maps meta keys (fingerprints) to the values this run needs; a mismatch is a
        CheckpointError unless `force`. Unreadable checkpoints are skipped with a warning.
        """
        versions = self.versions()
        if not versions:
            return None
        for version in reversed(versions):
            try:
                meta = self._manager.restore(
                    version, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as error:  # orbax/tensorstore raise many types on bad files
                warn(f"checkpoint {version} is unreadable ({_first_line(error)}); trying older")
                continue
            if not isinstance(meta, dict):
                warn(f"checkpoint {version} has no metadata; trying older")
                continue
            for key, wanted in expect.items():
                if meta.get(key) != wanted and not force:
                    raise CheckpointError(
                        f"checkpoint {version} in {self.directory} was made for another "
                        f"network or optimizer ({key} {meta.get(key)!r}, this run "
                        f"{wanted!r}); use another --run-dir, or --force-resume to load it"
                    )
            try:
                state = self._manager.restore(
                    version, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
                )["state"]
            except Exception as error:
                warn(f"checkpoint {version} is unreadable ({_first_line(error)}); trying older")
                continue
            return Restored(version, state, meta)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (all {len(versions)} are damaged); "
            "move the directory away to start afresh"
        )

    def close(self) -> None:
        """Finish pending writes."""
        self._manager.wait_until_finished()
        self._manager.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
