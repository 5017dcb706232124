"""Writing files so that a reader never sees half of one: write aside, then rename.

Every file a run writes for others to read (params, checkpoints of the replay, ps.json,
config.yaml, evaluation.json) goes through here: the bytes go to a temporary file beside
the target, named after this process so two writers never share it, and a rename puts it
in place in one step. `durable=True` also syncs the file and its directory, for files that
must survive a power cut (checkpoints); status files skip that cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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
