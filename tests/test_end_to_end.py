"""The real entry points, run as a user would, with seeded learning checks."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.serialization
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SOLVED = 195.0
DISTRIBUTED_BUDGET = 50_000  # run frames; seed 0 solved at 15-20k in 3 runs here
# Asynchronous runs are seeded but not reproducible (the order in which pushes reach the
# server varies from run to run), and some miss a budget that most meet with
# room to spare (CI once saw sharded seed 0 plateau at 130-170; seed 1 solved at 14k in
# one run and missed in the next). Those tests try the next seed when one misses: a path
# that does not learn, or learns 2.5 times slower, still fails all three.
ASYNC_SEEDS = ("0", "1", "2")


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


def finished_rows(path: Path) -> list[tuple[float, int, int, float]]:
    """(time, frames, bundle, return) of every complete line of an episodes.csv being
    written (a line without its newline yet is left for the next look)."""
    try:
        lines = path.read_text().split("\n")[1:-1]
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        time_, frames, bundle, _, ret, _ = line.split(",")
        rows.append((float(time_), int(frames), int(bundle), float(ret)))
    return rows


def frames_to_solve(*paths: Path, window: int = 20) -> int | None:
    """The run's frames (summed over bundles) when the mean return of `window` consecutive
    episodes, in order of wall time, first reached SOLVED; None if it has not."""
    rows = sorted(row for path in paths for row in finished_rows(path))
    returns = np.array([ret for *_, ret in rows])
    if len(returns) < window:
        return None
    means = np.convolve(returns, np.ones(window) / window, mode="valid")
    reached = np.flatnonzero(means >= SOLVED)
    if not len(reached):
        return None
    when = rows[reached[0] + window - 1][0]
    latest: dict[int, int] = {}
    for time_, frames, bundle, _ in rows:
        if time_ <= when:
            latest[bundle] = max(latest.get(bundle, 0), frames)
    return sum(latest.values())


def run_until_solved(
    run_dir: Path, script: str, *args: str, episodes: list[str], timeout: float = 400
) -> tuple[int | None, int, str]:
    """Run experiments/`script` until the returns logged in `episodes` (paths under
    `run_dir`) are solved, then stop it as a user would (SIGTERM: it saves and exits), or
    until it ends on its own frame budget. Returns the frames it needed (None: not solved
    within its budget), its exit status and its output."""
    output = run_dir.parent / f"{run_dir.name}.log"
    paths = [run_dir / name for name in episodes]
    with output.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, f"experiments/{script}", *args, "--run-dir", str(run_dir)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while (solved := frames_to_solve(*paths)) is None and process.poll() is None:
                assert time.monotonic() < deadline, f"neither solved nor done in {timeout:.0f}s"
                time.sleep(1.0)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return frames_to_solve(*paths) if solved is None else solved, code, output.read_text()


def run_async_until_solved(
    run_dir: Path, *args: str, episodes: list[str]
) -> tuple[int | None, int, str, Path]:
    """`run_until_solved` of cartpole.py for each of ASYNC_SEEDS in turn (a fresh run
    directory each) until one solves within DISTRIBUTED_BUDGET; returns the last attempt's
    result and its run directory. The output of a seed that missed is kept in front of the
    next one's, so a failure shows both."""
    missed = ""
    for seed in ASYNC_SEEDS:
        attempt_dir = run_dir.with_name(f"{run_dir.name}-seed{seed}")
        solved, code, output = run_until_solved(
            attempt_dir, "cartpole.py", "--seed", seed, "--total-frames",
            str(DISTRIBUTED_BUDGET), *args, episodes=episodes,
        )  # fmt: skip
        print(f"seed {seed}: solved after {solved} frames")
        if solved is not None and solved <= DISTRIBUTED_BUDGET:
            break
        missed += f"--- seed {seed} missed; its last output:\n{output[-1500:]}\n"
    return solved, code, missed + output[-3000:], attempt_dir


def test_cartpole_single_process_learns(tmp_path):
    """Seeded, one process: solved (20 episodes averaging 195) within 30k frames, where
    the run is stopped. Catches a learner that does not learn (a random policy averages
    22) or learns 2 times slower than it does (seed 0 solves at 14,744 frames here)."""
    run_dir = tmp_path / "run"
    solved, code, output = run_until_solved(
        run_dir, "cartpole.py", "--single-process", "--seed", "0", "--total-frames", "30000",
        episodes=["episodes.csv"],
    )  # fmt: skip
    print(f"single process: solved after {solved} frames")
    assert solved is not None and solved <= 30_000, output[-3000:]
    assert code in (0, 128 + signal.SIGTERM), output[-3000:]
    assert "frames" in output and "eta" in output
    assert (run_dir / "params.msgpack").stat().st_size > 0
    assert (run_dir / "config.yaml").exists()
    learner_lines = (run_dir / "learner.jsonl").read_text().splitlines()
    assert {"loss", "mean_q", "frames"} <= set(json.loads(learner_lines[-1]))


def test_cartpole_server_and_two_bundles_learn(tmp_path):
    """A server and 2 bundles, seeded (the order of pushes still varies): solved within
    50k run frames, where the run is stopped (seed 0, or the next of ASYNC_SEEDS where one
    misses). Catches an asynchronous path that does not learn or learns 2.5 times slower
    than it does (15-20k frames in 3 runs on the 2-core machine: pushes dropped or applied
    late, params not pulled, targets not refreshed)."""
    solved, code, output, run_dir = run_async_until_solved(
        tmp_path / "run", episodes=["bundle1/episodes.csv", "bundle2/episodes.csv"]
    )
    assert solved is not None and solved <= DISTRIBUTED_BUDGET, output
    assert code in (0, 128 + signal.SIGTERM), output
    stats = json.loads((run_dir / "ps.json").read_text())
    assert stats["workers"]["0"]["accepted"] > 0 and stats["workers"]["1"]["accepted"] > 0


def test_cartpole_two_server_shards_and_two_bundles_learn(tmp_path, read_run_params):
    """The same run as above with the server split in two processes: solved within the
    same budget, each shard applying every push to its half of the params, and the saved
    params the shards' final slices (a gather that swapped or mixed them up, or saved
    initial params, fails here; see also tests/test_params_gather.py)."""
    solved, code, output, run_dir = run_async_until_solved(
        tmp_path / "run", "--server-shards", "2",
        episodes=["bundle1/episodes.csv", "bundle2/episodes.csv"],
    )  # fmt: skip
    assert solved is not None and solved <= DISTRIBUTED_BUDGET, output
    assert code in (0, 128 + signal.SIGTERM), output
    stats = json.loads((run_dir / "ps.json").read_text())
    assert stats["server_shards"] == 2 and len(stats["shards"]) == 2
    halves = [shard["num_params"] for shard in stats["shards"]]
    assert sum(halves) == stats["num_params"] and abs(halves[0] - halves[1]) <= 16
    assert all(shard["version"] > 1000 for shard in stats["shards"])
    assert stats["workers"]["0"]["accepted"] > 0 and stats["workers"]["1"]["accepted"] > 0
    flat, versions, slices = read_run_params(run_dir)
    assert [len(s) for s in slices] == halves
    assert list(versions) == [shard["version"] for shard in stats["shards"]]
    np.testing.assert_array_equal(flat, np.concatenate(slices))


def test_cartpole_learns_through_a_per_host_aggregator(tmp_path):
    """A server and one bundle behind an aggregator (--aggregate-per-host --workers 1):
    every gradient goes through the aggregator's checks and forward, every param through
    its pulls, so a path that loses, scales or delays them fails to solve within the
    budget (the mean of several bundles' gradients, a larger batch with fewer updates per
    frame, is checked exactly in tests/test_aggregator.py; with 2 bundles CartPole took
    17-28k frames in 3 runs here, and missed 50k in 2). The server's only worker is the
    aggregator, its frames the bundle's."""
    solved, code, output, run_dir = run_async_until_solved(
        tmp_path / "run", "--aggregate-per-host", "--workers", "1",
        episodes=["bundle1/episodes.csv"],
    )  # fmt: skip
    assert solved is not None and solved <= DISTRIBUTED_BUDGET, output
    assert code in (0, 128 + signal.SIGTERM), output
    stats = json.loads((run_dir / "ps.json").read_text())
    assert set(stats["workers"]) == {"0"} and stats["num_workers"] == 1, stats["workers"]
    hub = json.loads((run_dir / "aggregator1.json").read_text())
    assert hub["received"]["0"] > 1000 and hub["forwards"] > 1000, hub
    assert stats["workers"]["0"]["accepted"] >= hub["shards_accepted"] - 2, (stats, hub)


def initial_pong_params() -> np.ndarray:
    """The params a default Pong server starts from (seed 0), flat, computed here apart."""
    import jax

    from gorila_jax.core.config import Config
    from gorila_jax.core.networks import make_network
    from gorila_jax.envs import make_env

    config = Config()
    env = make_env(config, seed=config.seed, training=True, num_envs=1)
    try:
        obs, num_actions = env.reset().obs, env.num_actions
    finally:
        env.close()
    params = make_network(config, num_actions).init(jax.random.key(config.seed), obs)
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
    assert "[single process] INFO: single-process DQN on Pong-v5" in result.stderr
    assert "updates" in result.stdout
    record = json.loads((tmp_path / "learner.jsonl").read_text().splitlines()[-1])
    assert record["updates"] >= 100 and np.isfinite(record["loss"])
    header = (tmp_path / "episodes.csv").read_text().splitlines()[0]
    assert header == "time,frames,bundle,env,return,length"
    saved = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    moved = np.abs(np.asarray(ravel_pytree(saved)[0], np.float64) - initial_pong_params())
    assert np.mean(moved > 0) > 0.3, "most params never moved (a learning rate of 0?)"
    updates = int(re.search(r"done: .* ([\d,]+) updates", result.stderr)[1].replace(",", ""))
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
         "--learning-starts", "500", "--gradient-part", "default", "--dc-asgd", "adaptive",
         "--run-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env=environ,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[bundle 1] INFO: 4 envs, learner over 4 local device(s)" in result.stdout
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["gradient_part"] == "default" and stats["dc_asgd"] == "adaptive"
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
