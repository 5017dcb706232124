"""A parameter server split in shards applies exactly what one server would; its files,
statistics and bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gorila_jax.core.config import Config
from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.core.optim import make_optimizer
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.io.checkpoint import CheckpointError
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.server.process import check_server_files
from gorila_jax.server.server_stats import combine, read_shard_stats, server_dir
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

ROOT = Path(__file__).resolve().parents[1]
SECRET = credentials.new_run_secret()


def authority(num_workers: int) -> WorkerAuthority:
    return WorkerAuthority(num_workers, secret=SECRET)


MAX_NORM = 1.0
LAMBDA = 0.5
LR = 0.05


def params_tree() -> dict:
    rng = np.random.default_rng(7)
    return {
        "dense": {
            "kernel": rng.standard_normal((4, 4)).astype(np.float32),
            "bias": rng.standard_normal(4).astype(np.float32),
        },
        "head": rng.standard_normal(3).astype(np.float32),
    }


INITIAL = np.asarray(ravel_pytree(params_tree())[0])  # 23 elements: shards of 8, 7, 8


def make_config(**overrides) -> Config:
    settings = {
        "env_id": "CartPole-v1",
        "optimizer": "adam",
        "learning_rate": LR,
        "max_grad_norm": MAX_NORM,
        "dc_asgd": "constant",
        "dc_asgd_lambda": LAMBDA,
        "outlier_k": 0.0,
        "seed": 3,
    }
    return dataclasses.replace(Config(), **(settings | overrides))


class Client:
    """One bundle's requests to one server process, through `handle` (no sockets)."""

    def __init__(self, server: ParameterServer, worker: int):
        self.server, self.worker, self.seq = server, worker, 0

    def request(self, kind: str, arrays=(), *, version: int = -1, **fields) -> transport.Message:
        self.seq += 1
        header = transport.make_header(
            kind, credential=credentials.worker_credential(SECRET, self.worker),
            worker=self.worker, seq=self.seq, version=version,
            fingerprint=self.server.fingerprint, **fields,
        )  # fmt: skip
        size = self.server.num_params
        return transport.decode_reply(
            self.server.handle(transport.encode(header, arrays)),
            expected_fingerprint=self.server.fingerprint,
            layout_for=lambda h: size if h["kind"] in ("welcome", "params") else None,
            max_bytes=1 << 20,
        )


def clip(grads: np.ndarray) -> np.ndarray:
    """What the bundle's gradient step does before a push (`learner.make_flat_grad_step`)."""
    clipper = optax.clip_by_global_norm(MAX_NORM)
    return np.asarray(clipper.update(jnp.asarray(grads), clipper.init(grads))[0])


@pytest.mark.parametrize("gradient_part", ["all", "default"])
def test_three_shards_apply_what_one_server_applies(gradient_part):
    """Adam, clipping (in the bundle) and DC-ASGD, two bundles pushing stale gradients
    between pulls: the three shards' slices joined equal the single server's params, and
    both equal optax's chain with the clipping in it (what the server did before)."""
    one = ParameterServer(make_config(gradient_part=gradient_part), params_tree(),
                          num_workers=2, authority=authority(2))  # fmt: skip
    config = make_config(gradient_part=gradient_part, server_shards=3)
    shards = [
        ParameterServer(config, params_tree(), num_workers=2, authority=authority(2), shard=k)
        for k in range(3)
    ]
    layout = shards[0].layout
    assert [s.num_params for s in shards] == [8, 7, 8]
    clients = {w: (Client(one, w), [Client(s, w) for s in shards]) for w in (0, 1)}
    held = {}  # worker -> (versions of the single server, of each shard) it holds
    for w, (single, pieces) in clients.items():
        single.request("hello")
        held[w] = (0, [piece.request("hello").header["version"] for piece in pieces])
    owned = {w: part_indices(INITIAL.size, 2, w, gradient_part, config.seed) for w in (0, 1)}
    # The reference: optax with the clipping inside, one state for all elements.
    tx = make_optimizer("adam", LR, eps=config.optimizer_eps, max_grad_norm=MAX_NORM,
                        dc_asgd_lambda=LAMBDA)  # fmt: skip
    params = jnp.asarray(INITIAL)
    state = tx.init(params)
    pulled = {0: params, 1: params}
    rng = np.random.default_rng(0)
    # (worker, pull first?): pushes computed on params 0 to 3 versions old.
    for step, (w, pull) in enumerate([(0, False), (1, False), (0, True), (1, False), (1, True)]):
        single, pieces = clients[w]
        if pull:
            version = single.request("pull", version=-1).header["version"]
            versions = [p.request("pull", version=-1).header["version"] for p in pieces]
            held[w] = (version, versions)
            pulled[w] = params
        size = INITIAL.size if owned[w] is None else len(owned[w])
        raw = (5.0 * rng.standard_normal(size)).astype(np.float32)  # norm ~20: clipped
        pushed = clip(raw)
        fields = {"mean_abs_td": 1.0, "frames": 10}
        ack = single.request("push", [pushed], version=held[w][0], **fields)
        assert ack.header["accepted"], ack.header
        if owned[w] is None:
            parts = layout.split(pushed)
        else:
            parts = [pushed[where] for where, _ in layout.split_indices(owned[w])]
        for shard, (piece, part) in enumerate(zip(pieces, parts, strict=True)):
            if owned[w] is not None:
                assert len(part) == len(shards[shard].parts[w])
            ack = piece.request("push", [part], version=held[w][1][shard], **fields)
            assert ack.header["accepted"], (step, shard, ack.header)
        joined = np.concatenate([np.asarray(s.params) for s in shards])
        chex.assert_trees_all_close(joined, np.asarray(one.params), rtol=1e-6, atol=1e-7)
        if owned[w] is None:
            updates, state = tx.update(jnp.asarray(raw), state, params, stale_params=pulled[w])
            params = optax.apply_updates(params, updates)
            chex.assert_trees_all_close(np.asarray(one.params), params, rtol=1e-5, atol=1e-6)
    assert [s.version for s in shards] == [5, 5, 5] and one.version == 5
    assert not np.allclose(np.asarray(one.params), INITIAL)


def test_a_shard_refuses_the_checkpoint_of_another_shard_or_layout():
    config = make_config(server_shards=2)
    first, second = (
        ParameterServer(config, params_tree(), num_workers=1, authority=authority(1), shard=k)
        for k in range(2)
    )
    state, meta = second.checkpoint_state()
    assert meta["shard_layout"] == [0, 12, 23] and meta["server_shard"] == 1
    with pytest.raises(CheckpointError, match="shard 1 of layout"):
        first.restore(state, meta)
    assert first.version == 0
    single = ParameterServer(make_config(), params_tree(), num_workers=1, authority=authority(1))
    with pytest.raises(CheckpointError, match="layout"):
        first.restore(*single.checkpoint_state())
    # A checkpoint without the server's part of the meta is no server checkpoint of this
    # format: refused in one line, nothing changed.
    state, meta = single.checkpoint_state()
    del meta["shard_layout"], meta["server_shard"]
    with pytest.raises(CheckpointError, match="lacks server_shard, shard_layout") as refused:
        single.restore(state, meta)
    assert "\n" not in str(refused.value) and single.version == 0


def test_a_shard_holds_only_its_slice_and_says_so_in_its_welcome():
    config = make_config(server_shards=3)
    shard = ParameterServer(config, params_tree(), num_workers=2, authority=authority(2), shard=2)
    welcome = Client(shard, 0).request("hello")
    np.testing.assert_array_equal(welcome.arrays[0], INITIAL[15:])
    info = welcome.header["config"]
    assert info["server_shard"] == 2 and info["shard_layout"] == [0, 8, 15, 23]
    assert info["num_params"] == info["part_size"] == 8
    with pytest.raises(ValueError, match="slice"):
        shard.params_tree()
    with pytest.raises(ValueError, match="at least one parameter"):
        ParameterServer(
            make_config(server_shards=24), params_tree(), num_workers=1, authority=authority(1)
        )


def test_combined_stats_keep_the_meaning_of_one_servers(tmp_path):
    shards = [
        {"server_shard": 0, "server_shards": 2, "version": 100, "updates_per_second": 30.0,
         "uptime_seconds": 9.0,
         "rejections": {"stale": 2}, "staleness_histogram": {"0": 50, "1": 48},
         "events": {"resumed": 1}, "unauthenticated": {}, "stopped_workers": [0, 1],
         "workers": {"0": {"accepted": 60, "pulls": 9}, "1": {"accepted": 40}},
         "frames": 4000, "checkpointed_version": 100, "num_params": 12, "num_workers": 2,
         "address": "tcp://a:1"},
        {"server_shard": 1, "server_shards": 2, "version": 96, "updates_per_second": 26.0,
         "uptime_seconds": 8.0,
         "rejections": {"stale": 1, "outlier": 3}, "staleness_histogram": {"0": 96},
         "events": {}, "unauthenticated": {"rejected": 1}, "stopped_workers": [1],
         "workers": {"0": {"accepted": 58, "pulls": 11}, "1": {"accepted": 38}},
         "frames": 3990, "checkpointed_version": 90, "num_params": 11, "num_workers": 2,
         "address": "tcp://b:2"},
    ]  # fmt: skip
    combined = combine(shards)
    assert combined["version"] == combined["updates"] == 98
    assert combined["updates_per_second"] == 28.0 and combined["uptime_seconds"] == 9.0
    assert combined["rejections"] == {"stale": 3, "outlier": 3}
    assert combined["staleness_histogram"] == {"0": 146, "1": 48}
    assert combined["unauthenticated"] == {"rejected": 1} and combined["events"] == {"resumed": 1}
    assert combined["workers"] == {"0": {"accepted": 60, "pulls": 11}, "1": {"accepted": 40}}
    assert combined["stopped_workers"] == [1]
    assert combined["frames"] == 4000 and combined["checkpointed_version"] == 90
    assert combined["num_params"] == 23 and combined["server_shards"] == 2
    assert combined["shards"] == shards
    assert read_shard_stats(tmp_path, 3) is None
    # Shard 0 reads the others' files and skips the run's ps.json until every one is there.
    for k, stats in enumerate(shards):
        assert read_shard_stats(tmp_path, 2) is None
        (server_dir(tmp_path, k, 2)).mkdir()
        (server_dir(tmp_path, k, 2) / "ps.json").write_text(json.dumps(stats))
    assert read_shard_stats(tmp_path, 2) == shards
    assert read_shard_stats(tmp_path, 3) is None  # a leftover of 2 shards is not one of 3
    (server_dir(tmp_path, 1, 2) / "ps.json").write_text('{"server_shard": 0}')  # the wrong one
    assert read_shard_stats(tmp_path, 2) is None


def test_combining_a_damaged_shard_file_skips_what_it_cannot_use():
    good = {
        "server_shard": 0,
        "server_shards": 2,
        "version": 10,
        "stopped_workers": [0, "1"],
        "workers": {"0": {"accepted": 5}},
        "rejections": {"stale": 1},
    }
    damaged = {
        "server_shard": 1,
        "server_shards": 2,
        "version": float("inf"),
        "stopped_workers": [[0], {"a": 1}, "1", True, 0],
        "workers": ["not", "a", "dict"],
        "rejections": {"stale": float("inf"), "outlier": "many", "bad_credential": 2},
    }
    combined = combine([good, damaged])
    assert combined["version"] == 5  # the damaged version counts as 0
    assert combined["workers"] == {"0": {"accepted": 5}}
    assert combined["stopped_workers"] == [0]
    assert combined["rejections"] == {"stale": 1, "bad_credential": 2}


def _fake_checkpoint(directory: Path) -> None:
    step = directory / "checkpoints" / "10"
    step.mkdir(parents=True)
    (step / "commit_success.txt").write_text("")


def test_a_run_directory_resumes_only_with_its_shard_count(tmp_path):
    check_server_files(tmp_path, 1)
    check_server_files(tmp_path, 3)
    _fake_checkpoint(tmp_path / "shard0")
    _fake_checkpoint(tmp_path / "shard1")
    with pytest.raises(CheckpointError, match="--server-shards 2"):
        check_server_files(tmp_path, 1)
    check_server_files(tmp_path, 2)  # the shards' own checkpoints check the count
    unsharded = tmp_path / "other"
    _fake_checkpoint(unsharded)
    with pytest.raises(CheckpointError, match="--server-shards 1"):
        check_server_files(unsharded, 2)


def test_shard_layout_even_is_byte_balanced():
    layout = ShardLayout.even(1_686_950, 4)
    sizes = [layout.size(k) for k in range(4)]
    assert max(sizes) - min(sizes) <= 16 and sum(sizes) == 1_686_950


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server-shards", "0"], "config.server_shards: must be a positive integer"),
        (["--server-shards", "40000"], "40000 server shards for 17410 parameters"),
    ],
)
def test_bad_shard_counts_are_one_line_and_exit_2(tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments/cartpole.py"), "--run-dir", str(tmp_path),
         *flags],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("shard*")) and not (tmp_path / "ps.json").exists()
