"""Shared pytest set-up: 4 CPU devices in the test process, no process left behind.

`chex.set_n_cpu_devices(4)` runs before anything starts JAX's backend, so every in-process
test sees 4 local CPU devices, as a user gets with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (one subprocess test keeps that path):
multi-device learner steps are checked in this process. `gorila_jax` is imported as
installed (`pip install -r requirements.txt` installs it editable), never through a path
set here.
"""

import contextlib

import chex
import psutil
import pytest

TEST_DEVICES = 4
chex.set_n_cpu_devices(TEST_DEVICES)


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


@pytest.fixture
def read_run_params():
    """A function of a finished run directory: its final params as one flat vector (read as
    evaluate.py reads them: `load_run_params` with the network of the run's config.yaml),
    the server shards' versions, and each shard's slice as written (empty when unsharded)."""
    import flax.serialization
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from gorila_jax.core.config import Config, load_yaml
    from gorila_jax.envs import model_of
    from gorila_jax.io.params_file import SLICE_FILE, load_run_params

    def read(run_dir):
        config = load_yaml(run_dir / "config.yaml", Config())
        loaded = load_run_params(run_dir, model_of(config).init(0), "the run's network")
        slices = [
            flax.serialization.msgpack_restore(path.read_bytes())["values"]
            for path in sorted(run_dir.glob(f"shard*/{SLICE_FILE}"))
        ]
        return np.asarray(ravel_pytree(loaded.params)[0]), loaded.versions, slices

    return read
