"""A sharded server's final params.msgpack is the shards' slices joined in shard order.

`launch._save_sharded_params` is what a 2-shard run ends with: every shard writes its final
slice, shard 0 joins them and saves the tree. The end-to-end run only sees the file's size;
these tests read the file back and compare it leaf by leaf with a tree built by hand.
"""

import dataclasses

import chex
import flax.serialization
import numpy as np
import pytest

from gorila_jax.core.config import Config
from gorila_jax.run.launch import PARAMS_SLICE, _save_sharded_params
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.server.server_stats import server_dir
from gorila_jax.wire import transport

TOKEN = transport.new_run_token()


def params_tree() -> dict:
    """24 elements, so two shards of 12: slices swapped would still have the right sizes."""
    return {
        "dense": {
            "kernel": np.zeros((4, 4), np.float32),
            "bias": np.zeros(4, np.float32),
        },
        "head": np.zeros(4, np.float32),
    }


def tree_from_flat(flat: np.ndarray) -> dict:
    """ravel_pytree's order written out by hand: keys sorted (dense/bias, dense/kernel,
    head), each leaf in C order."""
    return {
        "dense": {"bias": flat[0:4], "kernel": flat[4:20].reshape(4, 4)},
        "head": flat[20:24],
    }


def make_shards(tmp_path, shards: int) -> list[ParameterServer]:
    config = dataclasses.replace(Config(), env_id="CartPole-v1", server_shards=shards)
    return [
        ParameterServer(config, params_tree(), num_workers=1, token=TOKEN, run_dir=tmp_path,
                        shard=k)
        for k in range(shards)
    ]  # fmt: skip


def test_two_shards_final_params_are_their_slices_in_order(tmp_path):
    """Catches a gather that joins the slices in the wrong order (shard 1's first), saves
    shard 0's own initial params instead of its final ones, or unravels with another order.

    Each shard holds values nothing else has (its final params after "training"); the saved
    tree must be exactly the hand-built tree of slice 0 followed by slice 1."""
    servers = make_shards(tmp_path, 2)
    assert [s.num_params for s in servers] == [12, 12]
    final = np.arange(24, dtype=np.float32) * 0.25 + 1.0
    servers[0].params = final[:12]
    servers[1].params = final[12:]
    _save_sharded_params(servers[1], tmp_path, "tcp://127.0.0.1:1")
    assert not (tmp_path / "params.msgpack").exists()  # only shard 0 gathers
    _save_sharded_params(servers[0], tmp_path, "tcp://127.0.0.1:0")
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    chex.assert_trees_all_equal(saved, tree_from_flat(final))
    for k in range(2):
        written = np.load(server_dir(tmp_path, k, 2) / PARAMS_SLICE)
        np.testing.assert_array_equal(written, final[12 * k : 12 * (k + 1)])


def test_the_order_check_fails_on_swapped_slices(tmp_path):
    """The comparison above bites: the same gathered file checked against the slices in
    swapped order fails (so a gather that swapped them would have failed it)."""
    servers = make_shards(tmp_path, 2)
    final = np.arange(24, dtype=np.float32) * 0.25 + 1.0
    servers[0].params = final[:12]
    servers[1].params = final[12:]
    _save_sharded_params(servers[1], tmp_path, "tcp://127.0.0.1:1")
    _save_sharded_params(servers[0], tmp_path, "tcp://127.0.0.1:0")
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    swapped = np.concatenate([final[12:], final[:12]])
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(saved, tree_from_flat(swapped))


def test_three_shards_join_in_order(tmp_path):
    """Catches a join that orders the slices by anything but the shard number (e.g. the
    order their files were found or written in: here shard 2 writes first, shard 0 last)."""
    config = dataclasses.replace(Config(), env_id="CartPole-v1", server_shards=3)
    servers = [
        ParameterServer(config, params_tree(), num_workers=1, token=TOKEN, run_dir=tmp_path,
                        shard=k)
        for k in range(3)
    ]  # fmt: skip
    sizes = [s.num_params for s in servers]
    assert sum(sizes) == 24 and sizes == [8, 8, 8]
    final = -np.arange(24, dtype=np.float32) - 0.5
    bounds = np.cumsum([0, *sizes])
    for k in (2, 1, 0):  # shard 0 last: it gathers
        servers[k].params = final[bounds[k] : bounds[k + 1]]
        _save_sharded_params(servers[k], tmp_path, f"tcp://127.0.0.1:{k}")
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    chex.assert_trees_all_equal(saved, tree_from_flat(final))
