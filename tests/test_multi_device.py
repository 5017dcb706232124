"""The learner step over 4 local devices gives the gradients of 1 device on the same batch.

In this process (conftest gives it 4 CPU devices through chex), and once in a subprocess
started with the `XLA_FLAGS` a user types.
"""

import os
import subprocess
import sys

import chex
import jax
import numpy as np

from gorila_jax.core.learner import local_mesh, make_grad_step
from gorila_jax.core.networks import NatureCNN
from gorila_jax.core.replay import Transition


def test_four_devices_match_one_device_in_process():
    assert jax.local_device_count() == 4, jax.local_devices()
    rng = np.random.default_rng(0)
    batch_size = 8
    frames = lambda: rng.integers(0, 256, (batch_size, 4, 84, 84), dtype=np.uint8)  # noqa: E731
    batch = Transition(
        obs_tm1=frames(),
        action_tm1=rng.integers(0, 6, batch_size).astype(np.int32),
        rewards=rng.normal(size=(batch_size, 3)).astype(np.float32),
        discounts=np.full((batch_size, 3), 0.99, np.float32),
        obs_t=frames(),
    )
    weights = rng.random(batch_size).astype(np.float32)
    network = NatureCNN(num_actions=6)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    target = network.init(jax.random.key(1), batch.obs_tm1)
    results = []
    for devices in (jax.local_devices()[:1], jax.local_devices()):
        step = make_grad_step(network, double_dqn=True, huber_delta=1.0, mesh=local_mesh(devices))
        grads, metrics = step(params, target, batch, weights)
        results.append((grads, metrics.td_errors, metrics.loss))
        shards = metrics.td_errors.addressable_shards
        assert len({s.device for s in shards}) == len(devices), "the batch was not split"
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-6)
    assert float(np.abs(np.asarray(results[0][2]))) > 0


SCRIPT = """
import jax
from gorila_jax.core.learner import local_mesh
assert jax.local_device_count() == 4, jax.local_devices()
assert local_mesh().devices.size == 4
print("FOUR")
"""


def test_xla_flags_give_a_process_four_devices(tmp_path):
    environ = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,  # outside the checkout: gorila_jax comes from the installed package
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FOUR" in result.stdout
