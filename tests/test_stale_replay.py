"""experiments/stale_replay.py refuses what it cannot use in one line, before any work."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gorila_jax.core.config import Config, cartpole_defaults
from gorila_jax.io.config_file import write_resolved

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "experiments" / "stale_replay.py")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("config", "flags", "named"),
    [
        (None, (), "no config.yaml"),
        (Config(), ("--staleness-min", "5", "--staleness-max", "2"), "--staleness-min"),
        (Config(), ("--updates", "0"), "--updates"),
        (Config(), ("--bundle", "3"), "--bundle must be in 1..2"),
        (Config(), ("--optimizer-eps", "0"), "optimizer_eps"),
        (Config(), (), "no replay checkpoint for bundle 1"),
        (dataclasses.replace(Config(), dueling=True), (), "dueling or prioritized"),
        (cartpole_defaults(), (), "CartPole run"),
    ],
)
def test_bad_input_is_one_line(tmp_path, config, flags, named):
    """Catches a traceback (or work started: envs, a replay allocated) for a run dir without
    a config or replay, an impossible staleness range, a bundle the run never had, a bad
    optimizer setting, a dueling run (its network has no fc layer to probe) and a CartPole
    run, which the probe's Atari network cannot read."""
    if config is not None:
        write_resolved(dataclasses.replace(config, run_dir=str(tmp_path)), tmp_path)
    assert named in one_error(run(str(tmp_path), *flags))
