"""Shard state: S shards applying slices of a gradient sequence equal one server applying it.

Clipping is done before the split (as a bundle does); every optimizer the project offers,
with DC-ASGD on, then acts element by element, so the equality is exact up to float
rounding of the same operations.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gorila_jax.core.optim import make_optimizer
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.server.shard_state import (
    Push,
    ShardState,
    chunk_sizes,
    init_shard_state,
    make_apply,
    state_is_finite,
)

NUM_PARAMS = 1000


def clipped(grads: np.ndarray, max_norm: float) -> np.ndarray:
    """Global-norm clipping of the whole gradient, as the bundle does before splitting."""
    norm = np.linalg.norm(grads)
    return grads * min(1.0, max_norm / max(norm, 1e-12))


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd", "adagrad"])
@pytest.mark.parametrize("dc_asgd", [None, "constant", "adaptive"])
def test_three_shards_apply_exactly_what_one_server_applies(name, dc_asgd):
    compensated = dc_asgd is not None
    tx = make_optimizer(
        name, 1e-2, eps=1e-6,
        dc_asgd_lambda=None if dc_asgd is None else 0.5, dc_asgd_adaptive=dc_asgd == "adaptive",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    start = rng.normal(size=NUM_PARAMS).astype(np.float32)
    layout = ShardLayout.even(NUM_PARAMS, 3)
    whole_apply = make_apply(tx, NUM_PARAMS, compensated=compensated)
    whole = init_shard_state(tx, start)
    shards = [init_shard_state(tx, part) for part in layout.split(start)]
    shard_applies = [make_apply(tx, layout.size(k), compensated=compensated) for k in range(3)]
    history = [np.asarray(whole.params)]
    for step in range(6):
        grads = clipped(rng.normal(size=NUM_PARAMS).astype(np.float32) * 5, max_norm=10.0)
        stale = history[max(0, step - 2)]  # computed on params 2 versions old
        stale_push = jnp.asarray(stale) if compensated else None
        whole = whole_apply(whole, [Push(grads, None, stale_push)])
        for k in range(3):
            part_stale = jnp.asarray(layout.split(stale)[k]) if compensated else None
            shards[k] = shard_applies[k](
                shards[k], [Push(layout.split(grads)[k], None, part_stale)]
            )
        history.append(np.asarray(whole.params))
    joined = layout.join([np.asarray(s.params) for s in shards])
    np.testing.assert_allclose(joined, history[-1], rtol=1e-6, atol=1e-6)
    assert whole.version == 6 and all(s.version == 6 for s in shards)
    assert not np.allclose(history[-1], start)  # it did move


def test_partial_pushes_update_only_owned_elements_and_match_across_shards():
    tx = make_optimizer("adam", 1e-2, eps=1e-8)
    rng = np.random.default_rng(1)
    start = rng.normal(size=NUM_PARAMS).astype(np.float32)
    owned = np.sort(rng.choice(NUM_PARAMS, size=300, replace=False)).astype(np.int32)
    layout = ShardLayout.even(NUM_PARAMS, 3)
    whole = init_shard_state(tx, start)
    whole_apply = make_apply(tx, NUM_PARAMS, compensated=False)
    shards = [init_shard_state(tx, part) for part in layout.split(start)]
    applies = [make_apply(tx, layout.size(k), compensated=False) for k in range(3)]
    for _ in range(3):
        grads = rng.normal(size=owned.size).astype(np.float32)
        whole = whole_apply(whole, [Push(grads, jnp.asarray(owned))])
        for k, (positions, local) in enumerate(layout.split_indices(owned)):
            shards[k] = applies[k](shards[k], [Push(grads[positions], jnp.asarray(local))])
    params = np.asarray(whole.params)
    untouched = np.setdiff1d(np.arange(NUM_PARAMS), owned)
    np.testing.assert_array_equal(params[untouched], start[untouched])
    assert np.all(params[owned] != start[owned])
    joined = layout.join([np.asarray(s.params) for s in shards])
    np.testing.assert_allclose(joined, params, rtol=1e-6, atol=1e-7)


def test_apply_is_a_function_of_its_inputs_and_a_non_finite_state_is_seen():
    """Same state and gradients in, same state out (catches a compensated apply that
    donates, and so destroys, the state it was given); a NaN reaching the state is
    seen by `state_is_finite` in the params and in any optimizer leaf (catches a check
    that looks at the wrong leaves or at nothing)."""
    tx = make_optimizer("adam", 1e-2, eps=1e-8, dc_asgd_lambda=0.04)
    apply = make_apply(tx, 8, compensated=True)
    state = init_shard_state(tx, np.ones(8, np.float32))
    grads = np.arange(8.0, dtype=np.float32)
    first = apply(state, [Push(grads, None, state.params)])
    second = apply(state, [Push(grads, None, state.params)])
    chex.assert_trees_all_equal(first, second)
    assert isinstance(first, ShardState) and first.version == 1
    assert state_is_finite(np.asarray(first.params), first.opt_state)
    assert state.version == 0
    broken = apply(first, [Push(grads, None, None), Push(np.where(grads == 2, np.nan, grads))])
    assert not state_is_finite(np.asarray(broken.params), broken.opt_state)
    leaves, structure = jax.tree.flatten(first.opt_state)
    moment = next(i for i, leaf in enumerate(leaves) if leaf.shape == (8,))
    leaves[moment] = leaves[moment].at[5].set(jnp.inf)
    assert not state_is_finite(np.asarray(first.params), jax.tree.unflatten(structure, leaves))
    huge = np.full(8, 3e38, np.float32)  # finite, and its sum would overflow: still finite
    assert state_is_finite(huge) and not state_is_finite(np.append(huge, np.nan))
    with pytest.raises(ValueError, match="stale params of shape"):
        apply(state, [Push(grads, None, jnp.ones(3))])
    assert jax.tree.structure(first.opt_state) == jax.tree.structure(state.opt_state)
    assert optax.tree_utils.tree_get(first.opt_state, "count") is not None


@pytest.mark.parametrize("compensated", [False, True])
def test_a_batch_in_chunks_equals_the_pushes_one_at_a_time(compensated):
    """Catches a batch whose chunks (8 + 4 + 1 for 13) skip, repeat or reorder a push, or
    give a push another's stale params: 13 pushes with partial ones in the middle, applied
    as one batch and one by one."""
    tx = make_optimizer("adam", 1e-2, eps=1e-8, dc_asgd_lambda=0.5 if compensated else None)
    rng = np.random.default_rng(5)
    start = rng.normal(size=64).astype(np.float32)
    owned = jnp.asarray(np.sort(rng.choice(64, size=16, replace=False)).astype(np.int32))
    olds = [jnp.asarray(rng.normal(size=64).astype(np.float32)) for _ in range(3)]
    pushes = []
    for k in range(16):
        partial = k in (9, 11)
        grads = rng.normal(size=16 if partial else 64).astype(np.float32)
        stale = olds[k % 3] if compensated and k % 4 else None
        pushes.append(Push(grads, owned if partial else None, stale))
    batched = make_apply(tx, 64, compensated=compensated)
    one_by_one = make_apply(tx, 64, compensated=compensated)
    state = batched(init_shard_state(tx, start), pushes)
    reference = init_shard_state(tx, start)
    for push in pushes:
        reference = one_by_one(reference, [push])
    assert state.version == reference.version == 16
    chex.assert_trees_all_close(state, reference, rtol=1e-6, atol=1e-8)
    assert chunk_sizes(13) == [8, 4, 1] and chunk_sizes(70) == [32, 32, 4, 2]
