"""Shared pytest set-up: the repository importable without installing it, and no process
left behind by any test."""

import contextlib
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever a test started (launchers, servers, bundles) is killed when it ends, even if
    the test failed half-way, so one failure cannot leave a run eating the machine."""
    yield
    leftovers = psutil.Process().children(recursive=True)
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(leftovers, timeout=10)
