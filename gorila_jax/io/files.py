"""Writing files so that a reader never sees half of one: write aside, then rename.

Every file a run writes for others to read (params, checkpoints of the replay, ps.json,
config.yaml, evaluation.json) goes through here: the bytes go to a temporary file beside
the target, named after this process so two writers never share it, and a rename puts it
in place in one step. `durable=True` also syncs the file and its directory, for files that
must survive a power cut (checkpoints); status files skip that cost.

A run directory holds params, replays and keys: it and everything in it are its owner's
alone (`private_files`: directory mode 0o700 and umask 077, so files are 0o600).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

OWNER_ONLY_UMASK = 0o077
OWNER_ONLY_DIR_MODE = 0o700


@contextlib.contextmanager
def atomic_writer(path: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` when the block ends without an
    exception; on an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        tmp.replace(path)
        if durable:
            sync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes | str, *, durable: bool = False) -> Path:
    """Replace `path` by `data` (str is written as UTF-8) in one step; returns `path`."""
    with atomic_writer(path, durable=durable) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """Make every file and directory under `directory` (and itself) durable: fsync each."""
    for parent, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(parent))


def make_private_dir(directory: Path, *, create: bool = True) -> Path:
    """Create `directory` (and missing parents) readable by its owner only (mode 0o700);
    one that exists and lets others in is made so, with a warning line. With
    `create=False` a missing directory is left to whoever writes into it first (under
    umask 077 it is made 0o700 then), so that a run refused before it starts (a replay too
    large for the machine, say) leaves nothing behind."""
    directory = Path(directory)
    if not create and not directory.exists():
        parent = next(p for p in directory.absolute().parents if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):  # say so now, not at the first write
            raise PermissionError(errno.EACCES, f"cannot create it in {parent}")
        return directory
    directory.mkdir(parents=True, exist_ok=True, mode=OWNER_ONLY_DIR_MODE)
    status = directory.stat()
    mode = stat.S_IMODE(status.st_mode)
    if mode & ~OWNER_ONLY_DIR_MODE & 0o777 and status.st_uid == os.getuid():
        directory.chmod(OWNER_ONLY_DIR_MODE)
        log.warning(
            f"run directory {directory} was open to others (mode {mode:o}); now its owner's "
            f"only (mode {OWNER_ONLY_DIR_MODE:o})"
        )
    return directory


def owner_only_files() -> int:
    """Set this process's umask to 077 (files 0o600, directories 0o700, inherited by the
    processes it starts); returns the previous umask."""
    return os.umask(OWNER_ONLY_UMASK)


@contextlib.contextmanager
def private_files(run_dir: Path) -> Iterator[Path]:
    """While the block runs, everything this process creates is its owner's only (umask
    077), and `run_dir`, if it exists, is made mode 0o700 (if not, it is made so when the
    run first writes into it); the previous umask comes back after."""
    previous = owner_only_files()
    try:
        yield make_private_dir(run_dir, create=False)
    finally:
        os.umask(previous)
