"""Params on disk: the flax msgpack file a run writes and evaluation reads.

`params.msgpack` holds plain arrays in flax's msgpack encoding (never pickle). It is written
atomically by the single process and the parameter server at the end of a run, and read by
evaluation, which checks it leaf by leaf against the network the run's config describes so
that params of another game or network are refused with one line saying where they differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

from gorila_jax.files import write_atomically


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
