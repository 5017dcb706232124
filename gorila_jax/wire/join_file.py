"""RUN_DIR/join.json: what a bundle started with `--join` needs to join a running job.

Server shard 0 of a run started with room for more bundles (`--max-bundles` above the
bundles started) writes it once every shard has published its address, and removes it
when it stops: a join file is there while the job can take bundles. It holds the shards'
addresses, the run secret (a joining bundle derives its worker's credential from it, as
a bundle under SLURM does from RUN_DIR/run_secret), the network's fingerprint and the
environment, and the job's config, which a joining bundle plays with (a program of another
environment or network is turned away before it starts).
It is written owner-only, and read only when it is the reader's own and nobody else can
read it; its fields are checked one by one (JSON, never executed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from gorila_jax.io.files import write_atomically
from gorila_jax.wire.credentials import check_run_secret

JOIN_FILE = "join.json"
FORMAT = 1


class JoinError(ValueError):
    """A join file that is missing, unsafe or not one: the one line says which."""


class JoinInfo(NamedTuple):
    """A running job's invitation to more bundles."""

    endpoints: tuple[str, ...]  # each server shard's address, by shard
    secret: str  # the run secret
    fingerprint: str  # the network's tree fingerprint
    env_id: str
    launched: int  # bundles started with the job
    max_bundles: int  # the most it has room for
    config: dict  # the job's config (`core.config.to_dict`), which joining bundles use


def write_join_file(run_dir: Path, info: JoinInfo) -> Path:
    """Write RUN_DIR/join.json (mode 0600, whole or not at all)."""
    document = {"format": FORMAT, **info._asdict(), "endpoints": list(info.endpoints)}
    path = Path(run_dir) / JOIN_FILE
    write_atomically(path, json.dumps(document, indent=1))
    os.chmod(path, 0o600)
    return path


def remove_join_file(run_dir: Path) -> None:
    """The job takes no more bundles (its server is stopping)."""
    (Path(run_dir) / JOIN_FILE).unlink(missing_ok=True)


_FIELDS = {
    "endpoints": list,
    "secret": str,
    "fingerprint": str,
    "env_id": str,
    "launched": int,
    "max_bundles": int,
    "config": dict,
}


def read_join_file(run_dir: Path) -> JoinInfo:
    """The join file of the job in `run_dir`; JoinError (one line) when there is none (no
    job there takes bundles), when it is another account's or others can read it, or when
    it is not a join file of this version."""
    path = Path(run_dir) / JOIN_FILE
    try:
        status = path.stat()
    except FileNotFoundError:
        raise JoinError(
            f"no running job in {run_dir} takes bundles: {path} is missing (the job must be "
            "running, started with --max-bundles above its bundles)"
        ) from None
    except OSError as error:
        raise JoinError(f"{path}: {error.strerror}") from None
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise JoinError(f"{path} is another account's or readable by others: not used")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise JoinError(f"{path} is not a join file: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise JoinError(f"{path} is not a join file of format {FORMAT}")
    for name, kind in _FIELDS.items():
        value = document.get(name)
        if type(value) is not kind:
            raise JoinError(f"{path}: field {name!r} must be a {kind.__name__}, got {value!r}")
    endpoints = tuple(document["endpoints"])
    if not endpoints or not all(isinstance(e, str) and e.startswith("tcp://") for e in endpoints):
        raise JoinError(f"{path}: endpoints must be tcp:// addresses, got {list(endpoints)}")
    if not 1 <= document["launched"] < document["max_bundles"]:
        raise JoinError(
            f"{path}: launched {document['launched']} and max_bundles "
            f"{document['max_bundles']} leave no room"
        )
    try:
        check_run_secret(document["secret"], str(path))
    except ValueError as error:
        raise JoinError(str(error)) from None
    return JoinInfo(
        endpoints, document["secret"], document["fingerprint"], document["env_id"],
        document["launched"], document["max_bundles"], document["config"],
    )  # fmt: skip
