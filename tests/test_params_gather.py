"""A sharded server's final params are its shards' slices, joined in shard order on read.

`server.process.save_final_params` is what every shard of a 2-shard run ends with: its own
slice, version and layout in RUN_DIR/shard{k}/params_slice.msgpack, with no shard waiting
for another; `params_file.load_run_params` (what evaluate.py reads) joins them by the
layout. The end-to-end runs only check that a run's params load; these tests compare the
joined tree leaf by leaf with one built by hand, and feed the reader what a user may hand
it: a slice missing, damaged, or from a server split another way.
"""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gorila_jax.core.config import Config
from gorila_jax.io.params_file import (
    PARAMS_FILE,
    SLICE_FILE,
    ParamsError,
    load_run_params,
    save_params,
)
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.server.process import save_final_params
from gorila_jax.server.server_stats import server_dir
from gorila_jax.wire import credentials
from gorila_jax.wire.credentials import WorkerAuthority

AUTHORITY = WorkerAuthority(1, secret=credentials.new_run_secret())


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


def make_shards(run_dir, shards: int, final: np.ndarray, versions=None) -> list[ParameterServer]:
    """`shards` server shards whose params are their slices of `final`, at `versions`
    (0 each by default), built through the constructor as a resumed shard would be."""
    config = dataclasses.replace(Config(), env_id="CartPole-v1", server_shards=shards)
    versions = versions or [0] * shards
    servers = []
    for k in range(shards):
        fresh = ParameterServer(config, params_tree(), num_workers=1, authority=AUTHORITY, shard=k)
        bounds = fresh.layout.bounds
        state = fresh.state._replace(
            params=jnp.asarray(final[bounds[k] : bounds[k + 1]]), version=versions[k]
        )
        servers.append(
            ParameterServer(config, params_tree(), num_workers=1, authority=AUTHORITY,
                            run_dir=run_dir, shard=k, state=state)
        )  # fmt: skip
    return servers


def finish(servers, run_dir, order=None) -> None:
    """Let each shard stop (in `order`), writing its final slice."""
    for k in order or range(len(servers)):
        save_final_params(servers[k], run_dir)


FINAL = np.arange(24, dtype=np.float32) * 0.25 + 1.0


def test_two_shards_final_params_are_their_slices_in_order(tmp_path):
    """Catches a join in the wrong order (shard 1's slice first), a shard that saves its
    initial params instead of its final ones, or an unravel in another order: each shard
    holds values nothing else has, and the joined tree must be exactly the hand-built tree
    of slice 0 followed by slice 1. No whole file is written: nothing waits to gather."""
    servers = make_shards(tmp_path, 2, FINAL)
    assert [s.num_params for s in servers] == [12, 12]
    finish(servers, tmp_path, order=[1, 0])
    assert not (tmp_path / PARAMS_FILE).exists()
    loaded = load_run_params(tmp_path, params_tree(), "mlp")
    chex.assert_trees_all_equal(loaded.params, tree_from_flat(FINAL))
    assert loaded.versions == (0, 0)
    for k in range(2):
        assert (server_dir(tmp_path, k, 2) / SLICE_FILE).is_file()


def test_the_order_check_fails_on_swapped_slices(tmp_path):
    """The comparison above bites: the same joined params checked against the slices in
    swapped order fail (so a join that swapped them would have failed it)."""
    servers = make_shards(tmp_path, 2, FINAL)
    finish(servers, tmp_path)
    loaded = load_run_params(tmp_path, params_tree(), "mlp")
    swapped = np.concatenate([FINAL[12:], FINAL[:12]])
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(loaded.params, tree_from_flat(swapped))


def test_three_shards_join_in_order_with_their_versions(tmp_path):
    """Catches a join that orders the slices by anything but the shard number (the order
    their files were written in: shard 2 first, shard 0 last), and versions reported in
    another order than the shards'."""
    final = -np.arange(24, dtype=np.float32) - 0.5
    servers = make_shards(tmp_path, 3, final, versions=[10, 11, 12])
    assert [s.num_params for s in servers] == [8, 8, 8]
    finish(servers, tmp_path, order=[2, 1, 0])
    loaded = load_run_params(tmp_path, params_tree(), "mlp")
    chex.assert_trees_all_equal(loaded.params, tree_from_flat(final))
    assert loaded.versions == (10, 11, 12)


def test_a_missing_slice_is_named(tmp_path):
    servers = make_shards(tmp_path, 2, FINAL)
    finish(servers, tmp_path, order=[0])
    with pytest.raises(ParamsError, match=r"shard1/params_slice\.msgpack is missing"):
        load_run_params(tmp_path, params_tree(), "mlp")


def test_a_damaged_or_foreign_slice_is_refused_in_one_line(tmp_path):
    servers = make_shards(tmp_path, 2, FINAL)
    finish(servers, tmp_path)
    slice_1 = server_dir(tmp_path, 1, 2) / SLICE_FILE
    slice_1.write_bytes(b"\x81\xa6format\xa3bad")  # msgpack, but not a slice
    with pytest.raises(ParamsError, match="is not a params slice file") as caught:
        load_run_params(tmp_path, params_tree(), "mlp")
    assert "\n" not in str(caught.value)
    # A slice of a server split in 3 beside the slices of a server split in 2.
    other = tmp_path / "other"
    finish(make_shards(other, 3, FINAL), other)
    slice_1.write_bytes((server_dir(other, 1, 3) / SLICE_FILE).read_bytes())
    with pytest.raises(ParamsError, match="belongs to another split of the server"):
        load_run_params(tmp_path, params_tree(), "mlp")


def test_slices_of_another_network_and_no_params_at_all(tmp_path):
    servers = make_shards(tmp_path, 2, FINAL)
    finish(servers, tmp_path)
    bigger = {**params_tree(), "extra": np.zeros(3, np.float32)}
    with pytest.raises(ParamsError, match="hold 24 parameters, the run's network"):
        load_run_params(tmp_path, bigger, "mlp")
    with pytest.raises(ParamsError, match="no params in"):
        load_run_params(tmp_path / "empty", params_tree(), "mlp")


def test_a_whole_params_file_is_read_as_it_is(tmp_path):
    """An unsharded run's params.msgpack wins: its params, no versions."""
    tree = tree_from_flat(FINAL)
    save_params(tree, tmp_path / PARAMS_FILE)
    loaded = load_run_params(tmp_path, params_tree(), "mlp")
    chex.assert_trees_all_equal(loaded.params, tree)
    assert loaded.versions == ()


def test_a_resume_reports_how_far_apart_the_shards_checkpoints_are(tmp_path):
    """Each shard checkpoints on its own clock: the resume's log line gives each shard's
    newest complete checkpoint and the spread (an incomplete step does not count)."""
    from gorila_jax.server.process import checkpoint_skew

    for shard, steps in ((0, (100, 140)), (1, (120,)), (2, ())):
        for step in steps:
            done = tmp_path / f"shard{shard}" / "checkpoints" / str(step)
            done.mkdir(parents=True)
            (done / "commit_success.txt").write_text("")
    (tmp_path / "shard1" / "checkpoints" / "200").mkdir()  # being written: not complete
    assert checkpoint_skew(tmp_path, 3) == (
        "the shards resume from checkpoints at versions 140, 120, none (20 apart)"
    )
