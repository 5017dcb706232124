"""Gradient parts (the Gorila paper's gradient sharding): which parameters each bundle
pushes. (A server *shard* is something else: a process holding a slice of the params.)

Parameters are handled as one flat float32 vector (`jax.flatten_util.ravel_pytree` order).
A fixed random permutation of its elements, drawn from the run's seed, is cut into W equal
chunks; bundle w owns chunk w. With `gradient_part`:

- "all": every bundle pushes the whole gradient;
- "default": bundle w pushes exactly its chunk (1/W of the parameters);
- a fraction f in (0, 1]: bundle w pushes f * N elements of the permutation starting at its
  chunk, wrapping around, so f = 1/W is "default" and f = 1 is "all".

Server and bundles compute the same indices from (N, W, w, gradient_part, seed), so the wire
carries only the values.
"""

from __future__ import annotations

import math

import numpy as np

from gorila_jax.core.config import parse_gradient_part


def part_indices(
    num_params: int, num_workers: int, worker: int, gradient_part: str, seed: int
) -> np.ndarray | None:
    """Sorted int32 indices of the flat parameter vector that `worker` pushes; None = all."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside 0..{num_workers - 1}")
    factor = parse_gradient_part(gradient_part)
    if factor == "all" or (factor != "default" and factor >= 1.0):
        return None
    size = num_params // num_workers if factor == "default" else math.ceil(factor * num_params)
    size = max(1, size)
    permutation = np.random.default_rng(seed).permutation(num_params)
    start = worker * (num_params // num_workers)
    if factor == "default" and worker == num_workers - 1:
        size = num_params - start
    positions = (start + np.arange(size)) % num_params
    return np.sort(permutation[positions]).astype(np.int32)
