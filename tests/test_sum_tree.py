"""Tests for the vectorised sum tree: exact sums, descent, zero leaves, sampling frequencies."""

import numpy as np
import pytest

from gorila_jax.core.sum_tree import SumTree


def chi_square_bound(num_categories: int) -> float:
    """A generous upper bound for a chi-square statistic (mean df, sd sqrt(2 df), 6 sd)."""
    dof = num_categories - 1
    return dof + 6.0 * np.sqrt(2.0 * dof)


def test_total_and_leaves_after_random_updates_with_duplicates():
    rng = np.random.default_rng(0)
    capacity = 1000  # not a power of two: leaves 1000..1023 are padding
    tree = SumTree(capacity, track_min=True)
    reference = np.zeros(capacity)
    largest_written = 1.0
    for _ in range(300):
        size = int(rng.integers(1, 64))
        indices = rng.integers(0, capacity, size=size)
        indices[: size // 3] = indices[0]  # force duplicates inside one call
        priorities = rng.random(size) * 10.0
        priorities[rng.random(size) < 0.2] = 0.0
        tree.update(indices, priorities)
        for index, priority in zip(indices, priorities, strict=True):
            reference[index] = priority  # last write wins
        largest_written = max(largest_written, priorities.max())
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), reference)
    np.testing.assert_allclose(tree.total(), reference.sum(), rtol=1e-12)
    assert tree.min_nonzero() == reference[reference > 0].min()
    assert tree.max_priority == largest_written
    tree.check_valid()


def test_last_write_wins_within_one_call():
    tree = SumTree(8)
    tree.update(np.array([3, 5, 3, 3, 5]), np.array([1.0, 2.0, 4.0, 8.0, 16.0]))
    np.testing.assert_array_equal(tree.get(np.array([3, 5])), [8.0, 16.0])
    assert tree.total() == 24.0
    tree.check_valid()


def test_sample_matches_prefix_sum_search():
    rng = np.random.default_rng(1)
    capacity = 300
    tree = SumTree(capacity)
    # Integer priorities and half-integer targets keep every sum exact in float64.
    priorities = rng.integers(0, 5, size=capacity).astype(np.float64)
    tree.update(np.arange(capacity), priorities)
    cumulative = np.cumsum(priorities)
    targets = np.concatenate([np.arange(0, cumulative[-1]), np.arange(0.5, cumulative[-1])])
    expected = np.searchsorted(cumulative, targets, side="right")
    np.testing.assert_array_equal(tree.sample(targets), expected)


def test_zero_priority_leaves_are_never_sampled():
    rng = np.random.default_rng(2)
    capacity = 257
    tree = SumTree(capacity)
    priorities = np.where(rng.random(capacity) < 0.7, 0.0, rng.random(capacity) ** 8)
    priorities[-1] = 0.0
    priorities[0] = 0.0
    priorities[100] = 1e-300
    tree.update(np.arange(capacity), priorities)
    total = tree.total()
    cumulative = np.cumsum(priorities)
    targets = np.concatenate(
        [
            rng.random(20_000) * total,
            cumulative,  # exact interval boundaries
            [0.0, np.nextafter(total, 0.0), total, total * 2],  # at/above total are clamped
        ]
    )
    sampled = tree.sample(targets)
    assert np.all(priorities[sampled] > 0)


def test_sampling_frequencies_are_proportional_to_priorities():
    rng = np.random.default_rng(3)
    capacity = 50
    tree = SumTree(capacity)
    priorities = rng.random(capacity) + 0.05
    tree.update(np.arange(capacity), priorities)
    num_draws = 200_000
    sampled = tree.sample(rng.random(num_draws) * tree.total())
    counts = np.bincount(sampled, minlength=capacity)
    expected = num_draws * priorities / priorities.sum()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < chi_square_bound(capacity)


def test_sampling_detects_wrong_proportions():
    """The frequency check above can fail: a tree with other priorities breaks the bound."""
    rng = np.random.default_rng(4)
    capacity = 50
    tree = SumTree(capacity)
    priorities = rng.random(capacity) + 0.05
    tree.update(np.arange(capacity), priorities**2)
    num_draws = 200_000
    counts = np.bincount(tree.sample(rng.random(num_draws) * tree.total()), minlength=capacity)
    expected = num_draws * priorities / priorities.sum()
    assert float(((counts - expected) ** 2 / expected).sum()) > chi_square_bound(capacity)


def test_capacity_one_and_min_tracking():
    tree = SumTree(1, track_min=True)
    assert tree.min_nonzero() == np.inf
    tree.update(np.array([0]), np.array([3.0]))
    assert tree.total() == 3.0 and tree.min_nonzero() == 3.0
    np.testing.assert_array_equal(tree.sample(np.array([0.0, 2.9])), [0, 0])
    tree.check_valid()


def test_memory_is_at_most_16_bytes_per_padded_leaf():
    tree = SumTree(1 << 10)
    assert tree.nbytes == 16 * (1 << 10)
    assert SumTree.bytes_needed(1000) == 16 * 1024
    assert SumTree.bytes_needed(1000, track_min=True) == 32 * 1024


def test_bad_inputs_are_rejected():
    tree = SumTree(4)
    with pytest.raises(ValueError, match="total priority is 0"):
        tree.sample(np.array([0.0]))
    with pytest.raises(ValueError, match="finite"):
        tree.update(np.array([0]), np.array([-1.0]))
    with pytest.raises(IndexError):
        tree.update(np.array([4]), np.array([1.0]))
    with pytest.raises(ValueError):
        SumTree(0)
