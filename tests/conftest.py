"""Shared pytest set-up: no process left behind by any test.

`gorila_jax` is imported as installed (`pip install -r requirements.txt` installs it
editable), never through a path set here.
"""

import contextlib

import psutil
import pytest


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
