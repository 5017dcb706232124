"""Params on disk: the flax msgpack files a run writes and evaluation reads.

`params.msgpack` holds plain arrays in flax's msgpack encoding (never pickle). It is written
atomically by the single process and an unsharded parameter server at the end of a run, and
read by evaluation, which checks it leaf by leaf against the network the run's config
describes so that params of another game or network are refused with one line saying where
they differ.

A server in S shards writes no whole file: each shard writes its own final slice, with its
version and the layout, as RUN_DIR/shard{k}/params_slice.msgpack (`save_params_slice`) the
moment it stops, and `load_run_params` joins the slices by the layout when it reads the run.
Nobody waits for anybody: the params are complete as soon as the last shard has stopped,
and shards on hosts without a shared file system each leave their slice in their own run
directory, where the user collects them into one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from gorila_jax.io.files import write_atomically

PARAMS_FILE = "params.msgpack"
SLICE_FILE = "params_slice.msgpack"
SLICE_FORMAT = "gorila-params-slice"
SLICE_FORMAT_VERSION = 1


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line."""


def save_params(params: Any, path: Path) -> Path:
    """Write params as flax msgpack (plain arrays, no pickle), atomically."""
    return write_atomically(path, flax.serialization.to_bytes(jax.device_get(params)))


def describe_mismatch(saved: Any, expected: Any, path: str) -> str | None:
    """Where `saved` differs from `expected` (nested dicts of arrays), or None."""
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            return f"{path or 'the root'} is a single array, the network expects a mapping"
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"{path}/{k}".lstrip("/") for k in missing))
            if extra:
                parts.append("unexpected " + ", ".join(f"{path}/{k}".lstrip("/") for k in extra))
            return "; ".join(parts)
        for key in expected:
            problem = describe_mismatch(saved[key], expected[key], f"{path}/{key}")
            if problem:
                return problem
        return None
    if isinstance(saved, dict):
        return f"{path.lstrip('/')} is a mapping, the network expects an array"
    saved_shape = tuple(np.shape(saved))
    expected_shape = tuple(np.shape(expected))
    if saved_shape != expected_shape:
        return f"{path.lstrip('/')} has shape {saved_shape}, the network expects {expected_shape}"
    return None


def load_params(path: Path, template: Any, network_name: str) -> Any:
    """Read flax msgpack params and check them against `template` (the network's own init).

    Raises ParamsError (one line) when the file is missing, is not msgpack, or does not have the
    same structure and shapes as the template.
    """
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        saved = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several types for a bad file
        raise ParamsError(
            f"{path} is not a flax msgpack params file ({type(error).__name__})"
        ) from None
    expected = flax.serialization.to_state_dict(template)
    problem = describe_mismatch(saved, expected, "")
    if problem:
        raise ParamsError(f"{path} does not fit the run's network ({network_name}): {problem}")
    try:
        restored = flax.serialization.from_state_dict(template, saved)
    except (ValueError, KeyError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ParamsError(
            f"{path} does not fit the run's network ({network_name}): {first}"
        ) from None
    return jax.tree.map(lambda leaf, like: np.asarray(leaf, like.dtype), restored, template)


def save_params_slice(
    values: np.ndarray, path: Path, *, shard: int, bounds: tuple[int, ...], version: int
) -> Path:
    """Write one server shard's flat float32 slice with its version and the shard layout
    (msgpack, no pickle), atomically."""
    document = {
        "format": SLICE_FORMAT,
        "format_version": SLICE_FORMAT_VERSION,
        "shard": int(shard),
        "bounds": [int(b) for b in bounds],
        "version": int(version),
        "values": np.asarray(values, np.float32),
    }
    return write_atomically(path, flax.serialization.msgpack_serialize(document))


def _read_slice(path: Path) -> dict:
    """One slice file, its fields checked; ParamsError (one line) when it is not one."""
    try:
        document = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several types for a bad file
        raise ParamsError(f"{path} is not a params slice file ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != SLICE_FORMAT:
        raise ParamsError(f"{path} is not a params slice file")
    if document.get("format_version") != SLICE_FORMAT_VERSION:
        raise ParamsError(
            f"{path} is a params slice of format version {document.get('format_version')!r}; "
            f"this version of gorila_jax reads version {SLICE_FORMAT_VERSION}"
        )
    bounds, shard = document.get("bounds"), document.get("shard")
    values = document.get("values")
    if (
        not isinstance(bounds, list)
        or not isinstance(shard, int)
        or not isinstance(document.get("version"), int)
        or not 0 <= shard < len(bounds) - 1
        or not isinstance(values, np.ndarray)
        or values.dtype != np.float32
        or values.shape != (bounds[shard + 1] - bounds[shard],)
    ):
        raise ParamsError(f"{path} is a damaged params slice (its fields do not agree)")
    return document


def require_run_params(run_dir: Path) -> None:
    """Refuse (ParamsError, one line) a run directory that holds neither a whole params
    file nor any server shard's slice: a cheap look before anything is built
    (`load_run_params` checks what is there)."""
    if not (run_dir / PARAMS_FILE).is_file() and not any(run_dir.glob(f"shard*/{SLICE_FILE}")):
        raise ParamsError(
            f"no params in {run_dir}: neither {PARAMS_FILE} nor shard*/{SLICE_FILE} "
            "(a run writes them when it stops)"
        )


class RunParams(NamedTuple):
    """A run's final params and where they came from."""

    params: Any
    source: str  # the file, or the slice files, they were read from
    versions: tuple[int, ...]  # each server shard's version (empty for a whole file)


def load_run_params(run_dir: Path, template: Any, network_name: str) -> RunParams:
    """A run's final params: RUN_DIR/params.msgpack, or else the slices of a sharded
    server (RUN_DIR/shard{k}/params_slice.msgpack) joined by their layout.

    Slices are refused (ParamsError, one line) when one is missing, damaged, or written by
    a server split another way; shards that stopped at different versions are joined (each
    slice is that shard's final state) and their versions reported in `versions`.
    """
    whole = run_dir / PARAMS_FILE
    if whole.is_file():
        return RunParams(load_params(whole, template, network_name), str(whole), ())
    require_run_params(run_dir)
    found = sorted(run_dir.glob(f"shard*/{SLICE_FILE}"))
    first = _read_slice(found[0])
    bounds = first["bounds"]
    shards = len(bounds) - 1
    slices: list[np.ndarray | None] = [None] * shards
    versions = [0] * shards
    for shard in range(shards):
        path = run_dir / f"shard{shard}" / SLICE_FILE
        if not path.is_file():
            raise ParamsError(
                f"{path} is missing: a server in {shards} shards leaves one slice per shard "
                "(copy each host's shard directory into the run directory)"
            )
        document = _read_slice(path)
        if document["bounds"] != bounds or document["shard"] != shard:
            raise ParamsError(
                f"{path} belongs to another split of the server (shard {document['shard']} "
                f"of bounds {document['bounds']}, expected shard {shard} of {bounds})"
            )
        slices[shard], versions[shard] = document["values"], document["version"]
    flat = np.concatenate(slices)
    flat_template, unravel = ravel_pytree(template)
    if flat.shape != flat_template.shape:
        raise ParamsError(
            f"{run_dir}'s slices hold {flat.size:,} parameters, the run's network "
            f"({network_name}) has {flat_template.size:,}"
        )
    params = jax.tree.map(lambda leaf, like: np.asarray(leaf, like.dtype), unravel(flat), template)
    return RunParams(params, f"{run_dir}/shard*/{SLICE_FILE}", tuple(versions))
