"""The benchmark scripts keep up with the library: each parses its flags, the quick ones run.

Timings are not asserted (they are benchmarks, not tests); what is asserted is that a script
still runs against today's API and ends with a well-formed RESULT line, so a benchmark does
not silently rot when a signature changes (replay_checkpoint.py once did).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.name for path in (ROOT / "benchmarks").glob("*.py") if path.name != "common.py"
)
RESULT = re.compile(r"^RESULT (\w+) value=(\S+) floor=(\S+) ratio=(\S+)$", re.MULTILINE)


def run_script(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_a_bad_flag(name):
    shown = run_script(name, "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "usage:" in shown.stdout
    bad = run_script(name, "--no-such-flag")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr[-2000:]


@pytest.mark.parametrize(
    "name, args",
    [
        ("replay.py", ("2000",)),
        ("replay_checkpoint.py", ("--capacity", "800", "--repeats", "2")),
        (
            "across_hosts.py",
            ("--loopback-only", "--pushes", "3", "--warmup", "1", "--repeats", "1"),
        ),
    ],
)
def test_a_quick_benchmark_prints_its_figure_next_to_its_floor(name, args, tmp_path):
    done = run_script(name, *args, cwd=tmp_path)  # scratch files land in tmp_path
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = RESULT.findall(done.stdout)
    assert results, done.stdout[-2000:]
    for _, value, floor, ratio in results:
        assert float(value) > 0 and float(floor) > 0
        assert float(ratio) == pytest.approx(float(value) / float(floor), rel=1e-2)
