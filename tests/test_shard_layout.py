"""Shard layout: contiguous byte-balanced slices, and gradient sharding composed with them."""

import numpy as np
import pytest

from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.core.shard_layout import ShardLayout


@pytest.mark.parametrize(
    ("num_params", "shards", "spread"),
    [(10, 1, 0), (10, 3, 1), (1_687_206, 4, 16), (1_687_206, 2, 16), (17_410, 2, 16), (7, 7, 0),
     (127, 2, 1), (128, 2, 0)],
)  # fmt: skip
def test_even_layout_covers_everything_once_and_balances(num_params, shards, spread):
    layout = ShardLayout.even(num_params, shards)
    sizes = [layout.size(k) for k in range(shards)]
    assert layout.num_shards == shards and layout.num_params == num_params
    assert sum(sizes) == num_params and max(sizes) - min(sizes) <= spread and min(sizes) >= 1
    if spread == 16:  # large enough to align: every inner boundary on 16 elements
        assert all(b % 16 == 0 for b in layout.bounds[:-1])
    flat = np.arange(num_params, dtype=np.float32)
    parts = layout.split(flat)
    assert all(np.shares_memory(p, flat) for p in parts)  # views, no copy
    np.testing.assert_array_equal(layout.join(parts), flat)


def test_even_layout_spread_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        shards = int(rng.integers(1, 40))
        num_params = int(rng.integers(shards, 3_000_000))
        layout = ShardLayout.even(num_params, shards)
        sizes = np.diff(layout.bounds)
        assert sizes.sum() == num_params and sizes.min() >= 1
        aligned = num_params >= 16 * 4 * shards
        assert sizes.max() - sizes.min() < (32 if aligned else 2), (num_params, shards)
        if aligned:
            assert all(b % 16 == 0 for b in layout.bounds[:-1])


@pytest.mark.parametrize(
    ("num_params", "shards", "message"),
    [(10, 0, "positive integer"), (3, 4, "at least one parameter"), (10, -1, "positive")],
)
def test_bad_shard_counts_are_refused_in_one_line(num_params, shards, message):
    with pytest.raises(ValueError, match=message) as info:
        ShardLayout.even(num_params, shards)
    assert "\n" not in str(info.value)


def test_owned_indices_reach_exactly_the_shards_that_hold_them():
    num_params, layout = 1000, ShardLayout.even(1000, 3)
    rng = np.random.default_rng(0)
    grads = rng.normal(size=num_params).astype(np.float32)
    for worker in range(2):
        owned = part_indices(num_params, 2, worker, "default", seed=1)
        values = grads[owned]
        rebuilt = np.zeros(num_params, np.float32)
        for shard, (positions, local) in enumerate(layout.split_indices(owned)):
            assert np.all((local >= 0) & (local < layout.size(shard)))
            rebuilt[layout.bounds[shard] + local] = values[positions]
        mask = np.zeros(num_params, bool)
        mask[owned] = True
        np.testing.assert_array_equal(rebuilt[mask], grads[mask])
        assert np.all(rebuilt[~mask] == 0)
    # A bundle owning indices in one slice only sends nothing to the others.
    parts = layout.split_indices(np.array([0, 5, 7]))
    assert [len(local) for _, local in parts] == [3, 0, 0]
