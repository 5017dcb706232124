"""The project installs as a package: entry points run from any directory, no path hacks."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def test_pyproject_and_requirements_declare_the_same_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    assert declared == set(requirement_lines(ROOT / "requirements.txt"))
    assert "-e ." in (ROOT / "requirements.txt").read_text().splitlines()


def test_no_module_edits_the_import_path():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("gorila_jax", "experiments", "benchmarks", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"sys\.path\.(insert|append)", path.read_text())
    ]
    assert offenders == []


def run_elsewhere(tmp_path: Path, *args: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


def test_help_and_a_bad_flag_from_another_directory(tmp_path):
    shown = run_elsewhere(tmp_path, str(ROOT / "experiments" / "pong.py"), "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--checkpoint-replay" in shown.stdout and "--total-frames" in shown.stdout
    bad = run_elsewhere(tmp_path, str(ROOT / "experiments" / "pong.py"), "--n-step", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: config.n_step: must be a positive integer, got 0"
    ]
    imported = run_elsewhere(tmp_path, "-c", "import gorila_jax; print(gorila_jax.__file__)")
    assert imported.stdout.strip() == str(ROOT / "gorila_jax" / "__init__.py")


@pytest.mark.slow
def test_the_local_launcher_runs_from_another_directory(tmp_path):
    result = run_elsewhere(
        tmp_path,
        str(ROOT / "experiments" / "cartpole.py"),
        "--total-frames", "2000", "--run-dir", "run",
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "[server] INFO: done" in result.stdout
    assert (tmp_path / "run" / "params.msgpack").exists()


def test_roles_that_never_checkpoint_do_not_import_orbax():
    """The launcher, a bundle and an aggregator import `gorila_jax.io.checkpoint` (for its
    error type and run metadata) but never write a checkpoint: orbax, about 3 s of CPU to
    import, is left to the roles that do (each test run starts hundreds of processes)."""
    modules = [
        "gorila_jax.run.launch",
        "gorila_jax.bundle.process",
        "gorila_jax.aggregator.process",
    ]
    probe = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('orbax' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert loaded.stdout.strip() == "False", loaded.stdout + loaded.stderr
    server = subprocess.run(
        [sys.executable, "-c", "import sys, gorila_jax.io.checkpoint as c; c._options(2); "
         "print('orbax' in sys.modules)"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert server.stdout.strip() == "True", server.stdout + server.stderr
