"""The real entry points, run as a user would, with seeded learning checks."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.serialization
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SOLVED = 195.0


def run(script: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"experiments/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def episode_returns(*paths: Path) -> np.ndarray:
    """Returns of every episode in the given CSV files, in order of wall time."""
    rows = []
    for path in paths:
        with path.open() as handle:
            rows += [(float(r["time"]), float(r["return"])) for r in csv.DictReader(handle)]
    rows.sort()
    return np.array([ret for _, ret in rows])


def best_window_mean(returns: np.ndarray, window: int = 20) -> float:
    assert len(returns) >= window, f"only {len(returns)} episodes"
    means = np.convolve(returns, np.ones(window) / window, mode="valid")
    return float(means.max())


def test_cartpole_single_process_learns(tmp_path):
    result = run(
        "cartpole.py", "--single-process", "--seed", "0", "--total-frames", "40000",
        "--run-dir", str(tmp_path),
    )  # fmt: skip
    assert "frames" in result.stdout and "eta" in result.stdout
    returns = episode_returns(tmp_path / "episodes.csv")
    assert best_window_mean(returns) >= SOLVED
    assert (tmp_path / "params.msgpack").stat().st_size > 0
    assert (tmp_path / "config.yaml").exists()
    learner_lines = (tmp_path / "learner.jsonl").read_text().splitlines()
    assert {"loss", "mean_q", "frames"} <= set(json.loads(learner_lines[-1]))


def test_cartpole_server_and_two_bundles_learn(tmp_path):
    # Asynchronous: the order of pushes varies from run to run, and so does the speed of
    # learning; 60k frames usually suffice (best window 176.8 in one CI run), 100k always
    # have so far.
    run("cartpole.py", "--seed", "0", "--total-frames", "100000", "--run-dir", str(tmp_path))
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["workers"]["0"]["accepted"] > 0 and stats["workers"]["1"]["accepted"] > 0
    returns = episode_returns(tmp_path / "bundle1/episodes.csv", tmp_path / "bundle2/episodes.csv")
    assert best_window_mean(returns) >= SOLVED


def test_cartpole_two_server_shards_and_two_bundles_learn(tmp_path):
    """The same run as above with the server split in two processes: the same return in
    the same frames, each shard applying every push to its half of the params."""
    run(
        "cartpole.py", "--seed", "0", "--total-frames", "100000", "--server-shards", "2",
        "--run-dir", str(tmp_path),
    )  # fmt: skip
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["server_shards"] == 2 and len(stats["shards"]) == 2
    halves = [shard["num_params"] for shard in stats["shards"]]
    assert sum(halves) == stats["num_params"] and abs(halves[0] - halves[1]) <= 16
    assert all(shard["version"] > 1000 for shard in stats["shards"])
    assert stats["workers"]["0"]["accepted"] > 0 and stats["workers"]["1"]["accepted"] > 0
    assert (tmp_path / "params.msgpack").stat().st_size > 4 * stats["num_params"]
    # The saved params are the two shards' final slices, shard 0's first (a gather that
    # swapped or mixed them up, or saved initial params, fails here; see also
    # tests/test_params_gather.py).
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    slices = [np.load(tmp_path / f"shard{k}" / "params_slice.npy") for k in range(2)]
    assert [len(s) for s in slices] == halves
    np.testing.assert_array_equal(np.asarray(ravel_pytree(saved)[0]), np.concatenate(slices))
    returns = episode_returns(tmp_path / "bundle1/episodes.csv", tmp_path / "bundle2/episodes.csv")
    assert best_window_mean(returns) >= SOLVED


def initial_pong_params() -> np.ndarray:
    """The params a default Pong server starts from (seed 0), flat, computed here apart."""
    from gorila_jax.config import Config
    from gorila_jax.envs import make_env
    from gorila_jax.networks import make_network
    from gorila_jax.single_process import init_params

    config = Config()
    env = make_env(config, seed=config.seed, training=True, num_envs=1)
    try:
        obs, num_actions = env.reset().obs, env.num_actions
    finally:
        env.close()
    params = init_params(make_network(config, num_actions), obs, config.seed)
    return np.asarray(ravel_pytree(params)[0])


def test_pong_local_default_runs_end_to_end(tmp_path):
    """The default Pong path (Nature CNN, a server and 2 bundles of 8 envs, Adam) pushes
    and applies real gradients: learning starts early here (1,800 frames a bundle), so each
    bundle takes about 7 x 8 learner steps. Catches a run that never learns (no push sent,
    pushes refused, or accepted but not applied), a params.msgpack saved from the initial
    params or from elsewhere (another seed's init is ~0.1 away, not within Adam's reach),
    and server steps larger than Adam's (at most about 3.2 learning rates per update)."""
    result = run(
        "pong.py", "--total-frames", "4000", "--learning-starts", "1800",
        "--run-dir", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert "[server] INFO: done" in result.stdout
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["num_workers"] == 2 and stats["frames"] >= 2 * 1800  # pushes report frames
    accepted = [stats["workers"][w].get("accepted", 0) for w in ("0", "1")]
    assert all(a > 0 for a in accepted), stats["workers"]
    assert stats["updates"] == stats["version"] == sum(accepted) > 0  # every push applied
    for bundle in ("bundle1", "bundle2"):
        assert (tmp_path / bundle / "episodes.csv").exists()
    assert (tmp_path / "params.msgpack").stat().st_size > 6_000_000  # the Nature CNN
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    final = np.asarray(ravel_pytree(saved)[0])
    initial = initial_pong_params()
    assert final.shape == initial.shape
    moved = np.abs(final.astype(np.float64) - initial)
    assert np.mean(moved > 0) > 0.3, "most params never moved"
    assert 0 < moved.max() <= 3.2 * 1e-4 * stats["updates"], moved.max()


def test_atari_single_process_learns_a_little_and_logs(tmp_path):
    """A single process on Pong takes 250 learner steps and logs them; its saved params are
    the initial ones moved by Adam steps. Catches a learner whose steps change nothing (a
    learning rate of 0, an update computed but not kept, params saved from the initial
    ones), steps larger than Adam's, and a learner log or episodes.csv in another shape."""
    result = run(
        "pong.py", "--single-process", "--total-frames", "2000", "--learning-starts", "1000",
        "--replay-capacity", "5000", "--num-envs", "4", "--run-dir", str(tmp_path),
        "--log-every-seconds", "1",
    )  # fmt: skip
    assert "single-process DQN on Pong-v5" in result.stdout
    assert "updates" in result.stdout
    record = json.loads((tmp_path / "learner.jsonl").read_text().splitlines()[-1])
    assert record["updates"] >= 100 and np.isfinite(record["loss"])
    header = (tmp_path / "episodes.csv").read_text().splitlines()[0]
    assert header == "time,frames,bundle,env,return,length"
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    moved = np.abs(np.asarray(ravel_pytree(saved)[0], np.float64) - initial_pong_params())
    assert np.mean(moved > 0) > 0.3, "most params never moved (a learning rate of 0?)"
    updates = int(re.search(r"done: .* ([\d,]+) updates", result.stdout)[1].replace(",", ""))
    assert 0 < moved.max() <= 3.2 * 1e-4 * updates, (moved.max(), updates)


def test_sharded_compensated_run_on_four_devices_per_bundle(tmp_path):
    """Gradient sharding, DC-ASGD and 4 local devices per process, through the whole stack.
    Compensation happened, not just its setting read back: the server's last checkpoint
    holds the adaptive form's running mean square of the gradients, non-zero on most
    elements, and some pushes arrived stale (so w - w_bak was non-zero for them; the
    correction itself is checked against numpy in test_gradient_and_server_adam.py).
    Catches a server that logs --dc-asgd but leaves the transform out of its optimizer,
    or never feeds it gradients."""
    environ = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "experiments/cartpole.py", "--total-frames", "8000",
         "--learning-starts", "500", "--shard-factor", "default", "--dc-asgd", "adaptive",
         "--run-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env=environ,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[bundle 1] INFO: 4 envs, learner over 4 local device(s)" in result.stdout
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["shard_factor"] == "default" and stats["dc_asgd"] == "adaptive"
    assert stats["workers"]["0"]["accepted"] > 100 and stats["workers"]["1"]["accepted"] > 100
    assert list((tmp_path / "server").glob("events.out.tfevents.*"))
    stale = sum(n for lag, n in stats["staleness_histogram"].items() if lag != "0")
    assert stale > 0, stats["staleness_histogram"]
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    saved = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    manager.close()
    mean_square = np.asarray(saved["opt_state"][1]["mean_square"])  # (clip, DC-ASGD, Adam)
    assert mean_square.shape == (stats["num_params"],)
    assert np.mean(mean_square > 0) > 0.5, "DC-ASGD's mean square never moved"
