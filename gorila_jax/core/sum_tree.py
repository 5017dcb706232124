"""Vectorised sum tree over float64 priorities for proportional prioritized replay.

The tree is one flat float64 array of size 2*P, where P is the capacity rounded up to a power
of two: node 1 is the root, node i has children 2i and 2i+1, and leaf k lives at node P+k.
Every operation works on a whole batch of indices or targets at once; the only Python loops
run over the log2(P) levels of the tree, never over batch elements.

Internal nodes are always recomputed from their two children (never patched with deltas), so
each internal node is exactly the float64 sum of its children and no rounding drift builds up
however many updates are made. An optional second tree of the same shape tracks the minimum
non-zero priority, which importance weights need.
"""

import numpy as np

__all__ = ["SumTree"]


def _round_up_to_power_of_two(value: int) -> int:
    """Smallest power of two that is >= value (and >= 1)."""
    return 1 << max(0, (int(value) - 1).bit_length())


class SumTree:
    """Sum tree with vectorised update and descent, plus optional minimum tracking."""

    def __init__(self, capacity: int, track_min: bool = False, initial_max_priority: float = 1.0):
        """Create a tree of `capacity` zero-priority leaves."""
        if capacity < 1:
            raise ValueError(f"SumTree capacity must be >= 1, got {capacity}")
        if not (np.isfinite(initial_max_priority) and initial_max_priority > 0):
            raise ValueError(f"initial_max_priority must be > 0, got {initial_max_priority}")
        self.capacity = int(capacity)
        self.num_leaves = _round_up_to_power_of_two(self.capacity)
        self.depth = self.num_leaves.bit_length() - 1
        self._level_shifts = np.arange(1, self.depth + 1, dtype=np.int64)
        self._sums = np.zeros(2 * self.num_leaves, dtype=np.float64)
        # Zero-priority leaves hold +inf in the min tree so they never count as the minimum.
        self._mins = np.full(2 * self.num_leaves, np.inf) if track_min else None
        # Largest priority ever written; it never decreases (new items get it in replay).
        self.max_priority = float(initial_max_priority)

    @staticmethod
    def bytes_needed(capacity: int, track_min: bool = False) -> int:
        """Bytes taken by the tree arrays for `capacity` leaves."""
        num_arrays = 2 if track_min else 1
        return num_arrays * 2 * _round_up_to_power_of_two(capacity) * 8

    @property
    def nbytes(self) -> int:
        """Bytes actually taken by the tree arrays."""
        return self._sums.nbytes + (0 if self._mins is None else self._mins.nbytes)

    def total(self) -> float:
        """Sum of all leaf priorities."""
        return float(self._sums[1])

    def min_nonzero(self) -> float:
        """Smallest non-zero leaf priority (+inf when every leaf is zero); needs track_min."""
        if self._mins is None:
            raise RuntimeError("SumTree was built with track_min=False")
        return float(self._mins[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Leaf priorities at `indices`."""
        return self._sums[self.num_leaves + self._checked_indices(indices)]

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaf priorities; with duplicate indices the last write wins."""
        indices = self._checked_indices(indices)
        priorities = np.broadcast_to(np.asarray(priorities, dtype=np.float64), indices.shape)
        if indices.size == 0:
            return
        if not np.all(np.isfinite(priorities)) or np.any(priorities < 0):
            raise ValueError("priorities must be finite and >= 0")
        # np.unique keeps the first occurrence; on the reversed arrays that is the last write.
        unique_indices, first_in_reversed = np.unique(indices[::-1], return_index=True)
        unique_priorities = priorities[::-1][first_in_reversed]
        self.max_priority = max(self.max_priority, float(unique_priorities.max()))

        nodes = unique_indices + self.num_leaves
        self._sums[nodes] = unique_priorities
        if self._mins is not None:
            self._mins[nodes] = np.where(unique_priorities > 0, unique_priorities, np.inf)
        # Recompute every ancestor, level by level from the bottom. A parent listed twice (two
        # updated siblings) is simply written twice with the same value.
        parents_by_level = nodes[None, :] >> self._level_shifts[:, None]
        left_by_level = parents_by_level << 1
        right_by_level = left_by_level | 1
        for parents, left, right in zip(
            parents_by_level, left_by_level, right_by_level, strict=True
        ):
            self._sums[parents] = self._sums[left] + self._sums[right]
            if self._mins is not None:
                self._mins[parents] = np.minimum(self._mins[left], self._mins[right])

    def sample(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index whose prefix-sum interval [sum before, sum through) contains each target.

        Targets must lie in [0, total); values at or above total (rounding in the caller) are
        clamped to the last leaf with non-zero priority. The descent never enters a subtree whose
        sum is zero, so zero-priority leaves are never returned.
        """
        total = self.total()
        if not total > 0:
            raise ValueError("cannot sample from a SumTree whose total priority is 0")
        remaining = np.array(targets, dtype=np.float64).reshape(-1)  # a copy, updated in place
        if remaining.size and not (remaining.min() >= 0 and np.isfinite(remaining.max())):
            raise ValueError("sample targets must be finite and >= 0")
        nodes = np.ones(remaining.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = nodes + nodes
            left_sum = self._sums[left]
            go_right = remaining >= left_sum
            # Never step into a zero-sum right subtree, even if rounding left `remaining` too big;
            # a zero-sum left subtree is never entered because `remaining` stays >= 0.
            go_right &= self._sums[left + 1] > 0
            remaining -= left_sum * go_right
            nodes = left + go_right
        return nodes - self.num_leaves

    def check_valid(self) -> None:
        """Assert that every internal node equals the combination of its children."""
        leaves = self._sums[self.num_leaves :]
        assert np.all(leaves >= 0), "negative leaf priority"
        assert np.all(leaves[self.capacity :] == 0), "padding leaf with non-zero priority"
        assert np.all(leaves <= self.max_priority), "leaf above max_priority"
        level_start = self.num_leaves
        while level_start > 1:
            parents = np.arange(level_start // 2, level_start)
            assert np.array_equal(
                self._sums[parents], self._sums[2 * parents] + self._sums[2 * parents + 1]
            ), "sum tree node differs from the sum of its children"
            if self._mins is not None:
                assert np.array_equal(
                    self._mins[parents],
                    np.minimum(self._mins[2 * parents], self._mins[2 * parents + 1]),
                ), "min tree node differs from the min of its children"
            level_start //= 2
        if self._mins is not None:
            expected_leaf_mins = np.where(leaves > 0, leaves, np.inf)
            assert np.array_equal(self._mins[self.num_leaves :], expected_leaf_mins), (
                "min tree leaves differ from the sum tree leaves"
            )

    def _checked_indices(self, indices: np.ndarray) -> np.ndarray:
        """Indices as a flat int64 array, bounds-checked against the capacity."""
        indices = np.asarray(indices).reshape(-1)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"SumTree indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64, copy=False)
        if indices.size and (indices.min() < 0 or indices.max() >= self.capacity):
            raise IndexError(f"SumTree index out of range [0, {self.capacity})")
        return indices
