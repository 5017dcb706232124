"""How the parameter server is split into shards: contiguous slices of the flat params.

The network's parameters travel and live as one flat float32 vector (ravel_pytree order).
With S server shards, shard k owns the contiguous slice `bounds[k]:bounds[k+1]`; the
slices differ by fewer than 32 elements (128 bytes), and when each can hold 64 elements
their boundaries are 64-byte aligned (see `even`), so they are byte-balanced. Every optimizer
in this project (adam, rmsprop, sgd, adagrad, DC-ASGD) acts element by element; only
global-norm clipping looks at the whole gradient. So S shards apply exactly what one server
would provided the gradient is clipped before it is split, in the bundle, and the shards do
not clip again.

Gradient parts compose: a bundle that owns the sorted flat `indices` sends each shard
the owned indices that fall in its slice (relative to the slice's start), and nothing to a
shard that holds none of them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ALIGN = 16  # elements (64 bytes of float32): slice boundaries fall on multiples of this...
ALIGN_MIN_SLICES = 4  # ...when every slice can hold at least this many such units


class ShardLayout(NamedTuple):
    """Slice boundaries of the flat parameter vector, one slice per server shard."""

    bounds: tuple[int, ...]  # S + 1 increasing offsets, from 0 to the parameter count

    @classmethod
    def even(cls, num_params: int, shards: int) -> ShardLayout:
        """S contiguous slices of nearly equal size, their boundaries on multiples of
        `ALIGN` elements when every slice can hold `ALIGN_MIN_SLICES` of them (sizes then
        differ by less than 2 * `ALIGN`: the last slice also takes the count's remainder
        modulo `ALIGN`), else by at most one element.

        The alignment is for speed: the jitted apply over a slice whose length is odd ran
        about 1.7x slower per element than over an even one (`benchmarks/sharded_server.py`,
        843,603 against 843,602 elements).
        """
        if not isinstance(shards, int) or shards < 1:
            raise ValueError(f"server shards must be a positive integer, got {shards!r}")
        if shards > num_params:
            raise ValueError(
                f"{shards} server shards for {num_params} parameters: each shard needs at "
                "least one parameter"
            )
        unit = ALIGN if num_params >= ALIGN * ALIGN_MIN_SLICES * shards else 1
        cuts = (np.linspace(0, num_params / unit, shards + 1).round() * unit).astype(np.int64)
        cuts[-1] = num_params
        return cls(tuple(int(b) for b in cuts))

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_params(self) -> int:
        return self.bounds[-1]

    def size(self, shard: int) -> int:
        """Elements owned by `shard`."""
        return self.bounds[shard + 1] - self.bounds[shard]

    def slice(self, shard: int) -> slice:
        """The part of the flat vector `shard` owns."""
        return slice(self.bounds[shard], self.bounds[shard + 1])

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """The flat vector cut into the shards' slices (views, no copy)."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"expected a flat vector of {self.num_params}, got {flat.shape}")
        return [flat[self.slice(k)] for k in range(self.num_shards)]

    def join(self, slices: list[np.ndarray]) -> np.ndarray:
        """The inverse of `split`: one flat vector from every shard's slice."""
        if [len(s) for s in slices] != [self.size(k) for k in range(self.num_shards)]:
            raise ValueError("slices do not match the shard layout")
        return np.concatenate(slices)

    def split_indices(self, indices: np.ndarray) -> list[tuple[slice, np.ndarray]]:
        """Per shard: the positions in sorted `indices` that it owns (a slice of them) and
        those indices relative to the shard's start. Shards owning none get an empty part."""
        indices = np.asarray(indices)
        cuts = np.searchsorted(indices, np.asarray(self.bounds), side="left")
        return [
            (
                slice(int(cuts[k]), int(cuts[k + 1])),
                (indices[cuts[k] : cuts[k + 1]] - self.bounds[k]).astype(np.int32),
            )
            for k in range(self.num_shards)
        ]
