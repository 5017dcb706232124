"""Operations: checkpoints, resume, preemption, lost bundles and servers, bad files.

Real processes, killed by pid, every wait bounded in time.
"""

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from gorila_jax.bundle.client import Push, ServerConnection, ServerError
from gorila_jax.bundle.remote_learner import RemoteLearner
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.core.networks import MLP
from gorila_jax.io.checkpoint import Checkpointer, CheckpointError
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "experiments" / "cartpole.py")
pytestmark = pytest.mark.slow


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, CARTPOLE, "--run-dir", str(run_dir), "--log-every-seconds", "1",
         "--stats-every-seconds", "0.5", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def read_stats(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "ps.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_until(predicate, timeout: float, what: str, launcher=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if launcher is not None and launcher.poll() is not None:
            output = launcher.communicate(timeout=60)
            raise AssertionError(f"run ended while waiting for {what}: {output}")
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def child_by_index(launcher: subprocess.Popen, index: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        try:
            if int(child.environ().get("GORILA_PROCESS_ID", -1)) == index:
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no child with index {index}")


def all_descendants(launcher: subprocess.Popen) -> list:
    return psutil.Process(launcher.pid).children(recursive=True)


def stop_and_check(launcher: subprocess.Popen, processes: list) -> tuple[str, str]:
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=60)
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left behind: {alive}"
    return out, err


def test_resume_continues_every_counter(tmp_path):
    common = ("--checkpoint-every-updates", "200", "--learning-starts", "300")
    first = subprocess.run(
        [sys.executable, CARTPOLE, "--run-dir", str(tmp_path), "--total-frames", "3000", *common],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    before = read_stats(tmp_path)
    assert before["checkpointed_version"] == before["version"] > 0
    second = subprocess.run(
        [sys.executable, CARTPOLE, "--run-dir", str(tmp_path), "--total-frames", "5000",
         "--resume", *common],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed from checkpoint {before['version']}" in second.stdout
    after = read_stats(tmp_path)
    assert after["version"] > before["version"]
    assert after["frames"] == 5000 and after["events"]["resumed"] == 1
    for worker in ("0", "1"):
        assert after["workers"][worker]["accepted"] > before["workers"][worker]["accepted"]
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) <= 3  # checkpoint_keep


def test_sigterm_to_the_server_checkpoints_and_stops_everything(tmp_path):
    launcher = start_run(tmp_path, "--total-frames", "10000000", "--learning-starts", "300")
    wait_until(lambda: read_stats(tmp_path).get("updates", 0) > 50, 120, "updates", launcher)
    processes = all_descendants(launcher)
    server = child_by_index(launcher, 0)
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=60)
    assert time.monotonic() - started < 30
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
    assert launcher.returncode == 143, err[-2000:]
    stats = read_stats(tmp_path)
    assert stats["checkpointed_version"] == stats["version"] > 50
    assert "[server] INFO: stopped" in out


@pytest.mark.parametrize("wire_security", ["token", "curve"])
def test_killed_bundle_is_restarted_and_rejoins(tmp_path, wire_security):
    launcher = start_run(
        tmp_path, "--total-frames", "10000000", "--learning-starts", "300",
        "--wire-security", wire_security,
    )  # fmt: skip
    # Both bundles pushing before one is killed (under load the second can start late: the
    # server's count alone may all be the first bundle's).
    wait_until(
        lambda: (
            (s := read_stats(tmp_path)).get("updates", 0) > 50
            and s.get("workers", {}).get("1", {}).get("accepted", 0) > 0
        ),
        120,
        "updates from both bundles",
        launcher,
    )
    victim = child_by_index(launcher, 2)
    os.kill(victim.pid, signal.SIGKILL)
    accepted_before = read_stats(tmp_path)["workers"]["1"]["accepted"]
    stats = wait_until(
        lambda: (
            (s := read_stats(tmp_path)).get("events", {}).get("bundle_rejoined")
            and s["workers"]["1"]["accepted"] > accepted_before + 20
            and s
        ),
        180,
        "the restarted bundle to push",
        launcher,
    )
    assert stats["events"]["bundle_rejoined"] == 1
    processes = all_descendants(launcher)
    _, err = stop_and_check(launcher, processes)
    assert "bundle 2" in err and "restarting it (1/3)" in err


def test_killed_bundle_without_restarts_stops_the_run(tmp_path):
    launcher = start_run(tmp_path, "--total-frames", "10000000", "--max-restarts", "0")
    wait_until(lambda: read_stats(tmp_path), 120, "ps.json", launcher)
    processes = all_descendants(launcher)
    victim = child_by_index(launcher, 1)
    os.kill(victim.pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    assert f"bundle 1 (pid {victim.pid}) exited with status -9" in err
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive


def test_killed_server_comes_back_from_its_checkpoint(tmp_path):
    launcher = start_run(
        tmp_path, "--total-frames", "10000000", "--learning-starts", "300",
        "--checkpoint-every-seconds", "1", "--server-timeout-seconds", "3",
    )  # fmt: skip
    wait_until(
        lambda: read_stats(tmp_path).get("checkpointed_version", -1) > 20, 120, "a checkpoint",
        launcher,
    )  # fmt: skip
    server = child_by_index(launcher, 0)
    os.kill(server.pid, signal.SIGKILL)
    killed_at = read_stats(tmp_path)["version"]
    stats = wait_until(
        lambda: (
            (s := read_stats(tmp_path)).get("events", {}).get("resumed")
            and s["version"] > killed_at + 50
            and s
        ),
        180,
        "the restarted server to apply updates",
        launcher,
    )
    assert stats["events"]["resumed"] == 1
    processes = all_descendants(launcher)
    out, err = stop_and_check(launcher, processes)
    assert "reconnected to the server at version" in out and "server (pid" in err


def test_a_suspended_run_goes_on_without_losing_the_server(tmp_path):
    """The whole job stopped with SIGSTOP (what `scontrol suspend` does) for twice the
    server timeout, then continued: the bundles take that time for their own, not for the
    server's silence, so none loses the server or reconnects, and updates go on."""
    launcher = start_run(
        tmp_path, "--total-frames", "10000000", "--learning-starts", "300",
        "--server-timeout-seconds", "8",
    )  # fmt: skip
    wait_until(lambda: read_stats(tmp_path).get("updates", 0) > 100, 120, "updates", launcher)
    job = [psutil.Process(launcher.pid), *all_descendants(launcher)]
    for process in job:
        process.suspend()
    time.sleep(16)
    for process in job:
        process.resume()
    resumed_at = read_stats(tmp_path)["version"]
    wait_until(
        lambda: read_stats(tmp_path).get("version", 0) > resumed_at + 200, 120,
        "updates after the resume", launcher,
    )  # fmt: skip
    out, err = stop_and_check(launcher, job[1:])
    log = out + err
    assert "lost the server" not in log and "reconnected" not in log, log[-3000:]
    gaps = re.findall(r"\[bundle \d\] INFO: did not run for (\d+)s \(suspended", log)
    assert any(10 <= int(gap) <= 60 for gap in gaps), (gaps, log[-3000:])  # the 16 s stop
    assert not read_stats(tmp_path)["rejections"].get("replayed")


# ---- in-process checks ----------------------------------------------------------------


def small_server(tmp_path, **overrides):
    config = dataclasses.replace(cartpole_defaults(), run_dir=str(tmp_path), **overrides)
    network = MLP(num_actions=2, hidden=(8,))
    params = network.init(__import__("jax").random.key(0), np.zeros((1, 4), np.float32))
    return (
        config,
        network,
        params,
        ParameterServer(config, params, num_workers=1, authority=AUTHORITY, run_dir=tmp_path),
    )


SECRET = credentials.new_run_secret()
AUTHORITY = WorkerAuthority(1, secret=SECRET)


def advance(server: ParameterServer, updates: int) -> None:
    """`updates` real updates of the server (unjudged pushes of a gradient of ones)."""
    for _ in range(updates):
        server.apply(0, np.ones(server.num_params, np.float32))


def expectations(config, server):
    return {"config": config, "expect": {"tree_fingerprint": server.fingerprint}}


def test_checkpoint_round_trip_and_keep(tmp_path):
    config, _, _, server = small_server(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=2)
    for _ in range(1, 5):
        advance(server, 1)
        server.save_checkpoint(checkpointer)
    assert checkpointer.versions() == [3, 4]
    _, _, _, fresh = small_server(tmp_path)
    state, _ = fresh.checkpoint_state()
    restored = checkpointer.restore_latest(state, **expectations(config, fresh))
    fresh.restore(restored.state, restored.meta)
    assert fresh.version == 4
    np.testing.assert_array_equal(np.asarray(fresh.params), np.asarray(server.params))
    checkpointer.close()


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config, _, _, server = small_server(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3)
    for _ in (1, 2):
        advance(server, 1)
        server.save_checkpoint(checkpointer)
    newest = tmp_path / "checkpoints" / "2"
    for path in newest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    state, _ = server.checkpoint_state()
    restored = Checkpointer(tmp_path, keep=3).restore_latest(state, **expectations(config, server))
    assert restored.version == 1
    assert any(
        r.levelno == logging.WARNING and "checkpoint 2 is unreadable" in r.getMessage()
        for r in caplog.records
    )
    for path in (tmp_path / "checkpoints" / "1").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        Checkpointer(tmp_path, keep=3).restore_latest(state, **expectations(config, server))


def test_checkpoint_of_other_training_settings_is_refused_unless_forced(tmp_path, caplog):
    config, _, _, server = small_server(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3)
    advance(server, 7)
    server.save_checkpoint(checkpointer)
    state, _ = server.checkpoint_state()
    other = dataclasses.replace(config, seed=5, learning_rate=0.5, max_grad_norm=1.0)
    with pytest.raises(CheckpointError) as refused:
        checkpointer.restore_latest(state, **expectations(other, server))
    message = str(refused.value)
    assert "\n" not in message
    for named in ("seed 0 -> 5", "learning_rate 0.001 -> 0.5", "max_grad_norm 10.0 -> 1.0"):
        assert named in message
    assert "--force-resume" in message and "--run-dir" in message
    with caplog.at_level(logging.WARNING, logger="gorila_jax"):
        forced = checkpointer.restore_latest(state, **expectations(other, server), force=True)
    assert forced.version == 7
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("--force-resume: checkpoint 7")
    assert "learning_rate 0.001 -> 0.5" in warnings[0] and "\n" not in warnings[0]
    caplog.clear()
    # Settings that are safe to change may differ.
    safe = dataclasses.replace(
        config, total_frames=10**9, log_every_seconds=1.0, checkpoint_keep=9, max_restarts=0
    )
    assert checkpointer.restore_latest(state, **expectations(safe, server)).version == 7
    assert checkpointer.restore_latest(state, **expectations(safe, server), force=True).version == 7
    assert not caplog.records  # a forced resume of the same settings says nothing
    checkpointer.close()


def test_stopped_workers_survive_a_restart_of_the_server(tmp_path):
    """A bundle that finished before the server was restarted does not say stop again."""
    config = dataclasses.replace(cartpole_defaults(), run_dir=str(tmp_path))
    network = MLP(num_actions=2, hidden=(8,))
    params = network.init(__import__("jax").random.key(0), np.zeros((1, 4), np.float32))
    authority = WorkerAuthority(2, secret=credentials.new_run_secret())
    server = ParameterServer(config, params, num_workers=2, authority=authority, run_dir=tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3)
    advance(server, 3)
    assert server.save_checkpoint(checkpointer)
    server.stopped_workers.add(0)  # bundle 1 is done; no update since the checkpoint
    assert server.checkpoint_due()
    assert server.save_checkpoint(checkpointer)
    assert checkpointer.versions() == [3]
    checkpointer.close()

    restarted = ParameterServer(
        config, params, num_workers=2, authority=authority, run_dir=tmp_path
    )
    state, _ = restarted.checkpoint_state()
    checkpointer = Checkpointer(tmp_path, keep=3)
    restored = checkpointer.restore_latest(state, **expectations(config, restarted))
    restarted.restore(restored.state, restored.meta)
    assert restarted.stopped_workers == {0} and not restarted.checkpoint_due()
    restarted.stopped_workers.add(1)  # the other bundle's stop ends the run
    assert restarted.all_workers_stopped()
    assert restarted.save_checkpoint(checkpointer)
    checkpointer.close()

    # Started again after the run had ended (every bundle stopped): it waits for hellos.
    continued = ParameterServer(
        config, params, num_workers=2, authority=authority, run_dir=tmp_path
    )
    checkpointer = Checkpointer(tmp_path, keep=3)
    restored = checkpointer.restore_latest(state, **expectations(config, continued))
    assert restored.meta["stopped_workers"] == [0, 1]
    continued.restore(restored.state, restored.meta)
    assert continued.stopped_workers == set() and not continued.all_workers_stopped()
    checkpointer.close()


def test_after_a_fallback_new_checkpoints_are_written_and_only_those_reported(tmp_path, caplog):
    config, _, _, server = small_server(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3)
    for _ in (1, 2):
        advance(server, 1)
        assert server.save_checkpoint(checkpointer)
    checkpointer.close()
    for path in (tmp_path / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")

    _, _, _, resumed = small_server(tmp_path)
    checkpointer = Checkpointer(tmp_path, keep=3)
    state, _ = resumed.checkpoint_state()
    restored = checkpointer.restore_latest(state, **expectations(config, resumed))
    resumed.restore(restored.state, restored.meta)
    assert resumed.version == 1
    assert any(
        r.levelno == logging.WARNING and "moved damaged checkpoint 2" in r.getMessage()
        for r in caplog.records
    )
    advance(resumed, 1)  # an update after the fallback, then the final checkpoint
    assert resumed.save_checkpoint(checkpointer)
    assert resumed.stats()["checkpointed_version"] == 2
    checkpointer.close()

    _, _, _, again = small_server(tmp_path)
    state, _ = again.checkpoint_state()
    restored = Checkpointer(tmp_path, keep=3).restore_latest(state, **expectations(config, again))
    assert restored.version == 2
    np.testing.assert_array_equal(np.asarray(restored.state["params"]), np.asarray(resumed.params))
    assert len(list((tmp_path / "damaged_checkpoints").iterdir())) == 1


class RefusingCheckpointer:
    """A checkpointer whose writes do not happen: refused, or failing like a full disk."""

    def __init__(self, outcome):
        self.outcome = outcome

    def save(self, step, state, meta, *, replace=False):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize("outcome", [False, OSError(28, "No space left on device")])
def test_a_checkpoint_that_was_not_written_is_never_reported(tmp_path, caplog, outcome):
    _, _, _, server = small_server(tmp_path)
    advance(server, 4)
    assert not server.save_checkpoint(RefusingCheckpointer(outcome))
    assert server.stats()["checkpointed_version"] == -1
    assert "checkpoint 4" in caplog.text
    server.write_stats("tcp://x")
    assert read_stats(tmp_path)["checkpointed_version"] == -1


def test_non_finite_params_are_never_checkpointed(tmp_path, caplog):
    config, _, params, healthy = small_server(tmp_path)
    server = ParameterServer(
        config, params, num_workers=1, authority=AUTHORITY, run_dir=tmp_path,
        state=healthy.state._replace(params=healthy.params.at[3].set(float("nan")), version=1),
    )  # fmt: skip
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert not server.save_checkpoint(checkpointer)
    assert checkpointer.versions() == [] and server.checkpointed_version == -1
    assert "non-finite" in caplog.text
    checkpointer.close()


def test_bundle_gives_up_with_a_clear_message_when_the_server_stays_away(tmp_path):
    config, network, params, server = small_server(
        tmp_path, server_timeout_seconds=1.0, server_retry_seconds=3.0, sync_every=1
    )
    sock, endpoint = transport.make_server_socket(
        zmq.Context.instance(), "tcp://127.0.0.1:0", server.max_bytes
    )
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock, endpoint, stop.is_set))
    thread.start()
    connection = ServerConnection(
        endpoint, credential=credentials.worker_credential(SECRET, 0), worker=0,
        fingerprint=server.fingerprint,
        num_params=server.num_params, max_bytes=server.max_bytes, timeout_seconds=1.0,
    )  # fmt: skip
    learner = RemoteLearner(config, network, params, [connection], num_workers=1)
    stop.set()
    thread.join(timeout=10)
    sock.close(linger=0)
    learner.client.push(Push(np.zeros(server.num_params, np.float32), 0.0, (0,), 0, pull=True))
    wait_until(lambda: learner.client.error is not None, 30, "the bundle to give up")
    assert "did not come back within 3s" in str(learner.client.error)
    assert learner.should_stop()
    with pytest.raises(ServerError, match="bundle lost the server"):
        learner.close()


def newest_replay_meta(run_dir: Path, name: str) -> dict:
    import zipfile

    newest = sorted((run_dir / "replay" / name).glob("replay-*.zip"))[-1]
    with zipfile.ZipFile(newest) as archive:
        return json.loads(archive.read("meta.json"))


def test_sigterm_then_resume_brings_back_the_replays_and_learns_at_once(tmp_path):
    learning_starts = 20_000  # frames per bundle; a refilled replay would wait this long
    common = ("--learning-starts", str(learning_starts), "--checkpoint-every-seconds", "600")
    launcher = start_run(tmp_path, "--total-frames", "10000000", *common)
    wait_until(lambda: read_stats(tmp_path).get("updates", 0) > 100, 180, "updates", launcher)
    processes = all_descendants(launcher)
    started = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=60)
    assert time.monotonic() - started < 30
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
    assert launcher.returncode == 143, err[-2000:]
    saved = {name: newest_replay_meta(tmp_path, name) for name in ("bundle1", "bundle2")}
    for meta in saved.values():
        assert meta["frames"] >= learning_starts
        assert meta["replay"]["num_adds"] * 4 >= learning_starts  # 4 CartPole envs, 1 frame
    stopped_version = read_stats(tmp_path)["version"]
    stopped_frames = sum(meta["frames"] for meta in saved.values())

    launcher = start_run(tmp_path, "--total-frames", "10000000", *common)
    stats = wait_until(
        lambda: (s := read_stats(tmp_path)).get("version", 0) > stopped_version and s,
        120, "a push after the resume", launcher,
    )  # fmt: skip
    # The first pushes come from the restored replays, long before learning_starts new frames.
    assert stats["frames"] - stopped_frames < learning_starts
    out, err = stop_and_check(launcher, all_descendants(launcher))
    for name, index in (("bundle1", 1), ("bundle2", 2)):
        assert f"[bundle {index}] INFO: resumed its replay from replay-" in out, out[-3000:]
        assert f"{saved[name]['frames']:,} frames" in out


def test_single_process_sigterm_checkpoints_and_resumes(tmp_path):
    learning_starts = 20_000
    common = ("--single-process", "--run-dir", str(tmp_path), "--learning-starts",
              str(learning_starts), "--checkpoint-every-seconds", "600")  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, CARTPOLE, *common, "--total-frames", "10000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def learned_lines() -> int:
        path = tmp_path / "learner.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    wait_until(lambda: learned_lines() >= 2, 180, "learner steps", process)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert process.returncode == 143, err[-2000:]
    assert "[single process] INFO: stopped:" in err
    assert (tmp_path / "params.msgpack").stat().st_size > 0
    versions = Checkpointer(tmp_path, keep=3).versions()
    assert versions and versions[-1] >= 200
    saved = newest_replay_meta(tmp_path, "single")

    # 2,000 more frames: without the replay nothing would be learned in them.
    resumed = subprocess.run(
        [sys.executable, CARTPOLE, *common, "--total-frames", str(saved["frames"] + 2000)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Log records (stderr) name the process and the level.
    assert f"[single process] INFO: resumed its learner at {versions[-1]:,} updates" in (
        resumed.stderr
    )
    assert "[single process] INFO: resumed its replay from" in resumed.stderr
    done = [line for line in resumed.stderr.splitlines() if "INFO: done:" in line][-1]
    updates = int(done.split(" frames, ")[1].split(" updates")[0].replace(",", ""))
    assert updates >= versions[-1] + 400  # one update per 4 agent steps of 4 envs at once


def test_a_run_directory_is_resumed_only_with_the_same_training_settings(tmp_path):
    common = [sys.executable, CARTPOLE, "--single-process", "--run-dir", str(tmp_path),
              "--learning-starts", "300"]  # fmt: skip

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*common, *extra], cwd=ROOT, capture_output=True, text=True, timeout=240
        )

    first = run("--total-frames", "1000")
    assert first.returncode == 0, first.stderr[-2000:]
    assert Checkpointer(tmp_path, keep=3).versions()
    trained_with = (tmp_path / "config.yaml").read_text()

    other = run("--total-frames", "2000", "--learning-rate", "0.01", "--seed", "3")
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, other.stderr[-2000:]
    for named in ("seed 0 -> 3", "learning_rate 0.001 -> 0.01", "--force-resume", "--run-dir"):
        assert named in errors[0]
    assert (tmp_path / "config.yaml").read_text() == trained_with  # nothing overwritten

    longer = run("--total-frames", "2000")  # a setting that is safe to change
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "[single process] INFO: resumed its learner" in longer.stderr
    assert (tmp_path / "config.1.yaml").read_text() == trained_with
    assert "total_frames: 2000" in (tmp_path / "config.yaml").read_text()


def read_shard_stats(run_dir: Path, shard: int) -> dict:
    try:
        return json.loads((run_dir / f"shard{shard}" / "ps.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def start_two_shard_run(tmp_path):
    """A local run of 2 server shards and 2 bundles, returned once both shards have
    checkpointed."""
    launcher = start_run(
        tmp_path, "--server-shards", "2", "--total-frames", "10000000",
        "--learning-starts", "300", "--checkpoint-every-seconds", "1",
        "--server-timeout-seconds", "3",
    )  # fmt: skip
    wait_until(
        lambda: all(read_shard_stats(tmp_path, k).get("checkpointed_version", -1) > 20
                    for k in (0, 1)),
        180, "a checkpoint of both shards", launcher,
    )  # fmt: skip
    return launcher


def kill_a_shard_and_see_it_back(tmp_path, launcher, shard: int) -> None:
    """kill -9 shard `shard` of the run and wait until the launcher has restarted it from
    its checkpoint and it applies pushes again, checking meanwhile that the other shard
    kept applying the bundles' pushes and is still the process it was."""
    other = 1 - shard
    victim, survivor = child_by_index(launcher, shard), child_by_index(launcher, other)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = read_shard_stats(tmp_path, other)["version"]
    during_outage = killed_at
    deadline = time.monotonic() + 180
    while not read_shard_stats(tmp_path, shard).get("events", {}).get("resumed"):
        assert time.monotonic() < deadline, f"shard {shard} did not come back"
        assert launcher.poll() is None, launcher.communicate(timeout=60)
        during_outage = max(during_outage, read_shard_stats(tmp_path, other).get("version", 0))
        time.sleep(0.25)
    assert during_outage > killed_at + 10, (killed_at, during_outage)
    resumed_at = read_shard_stats(tmp_path, shard)["version"]
    wait_until(
        lambda: read_shard_stats(tmp_path, shard).get("version", 0) > resumed_at + 50,
        120, f"the restarted shard {shard} to apply pushes", launcher,
    )  # fmt: skip
    assert child_by_index(launcher, other).pid == survivor.pid and survivor.is_running()


def test_killed_shards_come_back_one_after_the_other_and_the_run_params_are_whole(
    tmp_path, read_run_params
):
    """kill -9 of server shard 1 of 2, then, once it is back, of shard 0 (the first shard,
    which leaves the first slice): each time the launcher restarts the shard from its
    checkpoint on its port, the other keeps applying the bundles' pushes meanwhile and the
    bundles reconnect; SIGINT then stops every process within 30 s, and the run's params
    (as evaluate.py reads them) are the two shards' final slices, shard 0's first, each
    with its version. Catches a restarted shard that does not come back, that leaves no
    slice or a stale one, slices joined swapped, and bundles that stop pushing to one shard
    while the other is away."""
    launcher = start_two_shard_run(tmp_path)
    kill_a_shard_and_see_it_back(tmp_path, launcher, 1)
    kill_a_shard_and_see_it_back(tmp_path, launcher, 0)
    processes = all_descendants(launcher)
    started = time.monotonic()
    out, err = stop_and_check(launcher, processes)
    assert time.monotonic() - started < 30
    for shard in (0, 1):
        assert f"lost server shard {shard}" in out and f"reconnected to server shard {shard}" in out
        assert re.search(rf"shard {shard} \(pid \d+\).*restarting it \(1/3\)", err), err
    combined = read_stats(tmp_path)
    assert combined["server_shards"] == 2 and len(combined["shards"]) == 2
    flat, versions, slices = read_run_params(tmp_path)
    assert [len(s) for s in slices] == [shard["num_params"] for shard in combined["shards"]]
    assert list(versions) == [shard["version"] for shard in combined["shards"]]
    assert min(versions) > 0
    np.testing.assert_array_equal(flat, np.concatenate(slices))


def read_aggregator_stats(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "aggregator1.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_a_killed_aggregator_comes_back_and_its_bundles_with_it(tmp_path):
    """kill -9 of the aggregator (--aggregate-per-host): the launcher restarts it on its
    port, it says hello to the server again as the same worker, both bundles reconnect
    to it by themselves and their pushes reach the server again; SIGINT then stops every
    process. (A bundle with nothing in flight at the kill has nothing to lose: its next
    request reaches the new aggregator; one that loses a request reconnects.)"""
    launcher = start_run(
        tmp_path, "--aggregate-per-host", "--total-frames", "10000000",
        "--learning-starts", "300", "--server-timeout-seconds", "15",
    )  # fmt: skip
    wait_until(
        lambda: all(
            n > 20 for n in read_aggregator_stats(tmp_path).get("received", {0: 0}).values()
        ),
        120,
        "pushes from both bundles",
        launcher,
    )
    os.kill(child_by_index(launcher, 1).pid, signal.SIGKILL)
    before = read_stats(tmp_path)["updates"]
    (tmp_path / "aggregator1.json").unlink()
    wait_until(
        lambda: (
            all(n > 20 for n in read_aggregator_stats(tmp_path).get("received", {0: 0}).values())
            and read_stats(tmp_path)["updates"] > before + 20
        ),
        120,
        "both bundles' pushes through the restarted aggregator",
        launcher,
    )
    stats = read_stats(tmp_path)
    assert set(stats["workers"]) == {"0"} and stats["events"]["bundle_rejoined"] >= 1, stats
    processes = all_descendants(launcher)
    out, err = stop_and_check(launcher, processes)
    assert "aggregator 1 (pid" in err and "died with status -9" in err, err[-3000:]
    # A bundle whose request was in flight at the kill lost it and said hello again; one with
    # nothing in flight sent its next request to the new aggregator without losing anything
    # (both happen, by timing). Either way no loss is left without its reconnection.
    for bundle in (1, 2):
        lost = out.count(f"[bundle {bundle}] WARNING: lost the server")
        back = out.count(f"[bundle {bundle}] INFO: reconnected to the server")
        assert lost == back, (bundle, lost, back, out[-3000:])


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    """A checkpoint's format version (io.checkpoint.CHECKPOINT_FORMAT_VERSION) is checked
    before anything is read into the server: one of a later format, or one from before
    checkpoints recorded their config, is refused in one line naming both formats; nothing
    is silently upgraded. One without the field is of format 1 (the runs of the Pong
    seed-1 study were written so and resume)."""
    from gorila_jax.io.checkpoint import CHECKPOINT_FORMAT_VERSION, check_format

    config, _, _, server = small_server(tmp_path)
    state, meta = server.checkpoint_state()
    assert meta["format_version"] == CHECKPOINT_FORMAT_VERSION == 1
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.save(1, state, {**meta, "format_version": 2})
    with pytest.raises(CheckpointError) as refused:
        checkpointer.restore_latest(state, **expectations(config, server))
    message = str(refused.value)
    assert "checkpoint format 2" in message and "reads format 1" in message
    assert "\n" not in message and server.version == 0
    checkpointer.close()
    unversioned = {k: v for k, v in meta.items() if k != "format_version"}
    check_format(unversioned, "checkpoint 1")  # format 1
    with pytest.raises(CheckpointError, match="records no config"):
        check_format({k: v for k, v in unversioned.items() if k != "config"}, "checkpoint 1")
