"""The local launcher: a server and bundles as real processes, and none left behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "experiments" / "cartpole.py")
pytestmark = pytest.mark.slow


def start_local_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, CARTPOLE, "--run-dir", str(run_dir), "--log-every-seconds", "1", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_children(launcher: subprocess.Popen, count: int, run_dir: Path) -> list:
    """Wait until the server is up (ps.json) and all `count` children exist."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        children = psutil.Process(launcher.pid).children()
        if len(children) == count and (run_dir / "ps.json").exists():
            return children
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    raise AssertionError("the run did not start in time")


def assert_all_gone(processes: list) -> None:
    _gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


def process_index(process: psutil.Process) -> int:
    return int(process.environ()["GORILA_PROCESS_ID"])


def test_success_leaves_no_process(tmp_path):
    launcher = start_local_run(tmp_path, "--total-frames", "3000", "--learning-starts", "400")
    children = wait_for_children(launcher, 3, tmp_path)
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, err
    assert "[server] done" in out and "[bundle 1] done" in out and "[bundle 2] done" in out
    assert_all_gone(children)
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["updates"] > 0
    assert (tmp_path / "params.msgpack").exists()


def test_ctrl_c_stops_every_process(tmp_path):
    launcher = start_local_run(tmp_path, "--total-frames", "10000000")
    children = wait_for_children(launcher, 3, tmp_path)
    time.sleep(2)
    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    _out, err = launcher.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert launcher.returncode == 130
    assert "stopping" in err
    assert_all_gone(children)
