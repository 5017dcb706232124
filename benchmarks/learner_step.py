"""Benchmark: one learner step (loss + gradients) of the Nature CNN at batch 32.

Floor: the step's FLOPs (XLA cost analysis of the compiled step) divided by the float32
matmul rate measured in the same run, i.e. the time the step would take if every FLOP ran at
matmul speed. The FLOPs are those of the same step written with XLA's native convolutions
(`NatureCNNReference`), which are fewer than the shifted-matmul layers actually execute, so
the floor is not inflated by the faster formulation's extra work. The ratio is value/floor,
lower is better. Prints `RESULT learner_step value=<ms> floor=<ms> ratio=<value/floor>` last.

    python benchmarks/learner_step.py [--repeats 30] [--dqn]
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from common import compiled_flops, matmul_flops_per_second, median_seconds, result_line

from gorila_jax.core import cli
from gorila_jax.core.learner import local_mesh, make_grad_step
from gorila_jax.core.networks import NatureCNN, NatureCNNReference
from gorila_jax.core.replay import Transition


@dataclasses.dataclass(frozen=True)
class LearnerStepArgs:
    """Time one learner step against its matmul-rate floor."""

    repeats: int = 30
    """Timed steps; the median is reported."""
    batch_size: int = 32
    """Transitions per step."""
    dqn: bool = False
    """plain DQN target instead of Double DQN"""
    reference: bool = False
    """time NatureCNNReference (plain flax convolutions) instead, for comparison"""


def benchmark(args: LearnerStepArgs) -> int:
    rng = np.random.default_rng(0)
    batch_size = args.batch_size
    frames = lambda: rng.integers(0, 256, (batch_size, 4, 84, 84), dtype=np.uint8)  # noqa: E731
    batch = Transition(
        obs_tm1=frames(),
        action_tm1=rng.integers(0, 6, batch_size).astype(np.int32),
        rewards=rng.normal(size=(batch_size, 1)).astype(np.float32),
        discounts=np.full((batch_size, 1), 0.99, np.float32),
        obs_t=frames(),
    )
    weights = np.ones(batch_size, np.float32)
    network = NatureCNNReference(num_actions=6) if args.reference else NatureCNN(num_actions=6)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    target_params = network.init(jax.random.key(1), batch.obs_tm1)
    mesh = local_mesh()
    step = make_grad_step(network, double_dqn=not args.dqn, huber_delta=1.0, mesh=mesh)
    batch = jax.device_put(batch)

    def run():
        grads, metrics = step(params, target_params, batch, weights)
        jax.block_until_ready((grads, metrics))

    reference_step = make_grad_step(
        NatureCNNReference(num_actions=6), double_dqn=not args.dqn, huber_delta=1.0, mesh=mesh
    )
    flops = compiled_flops(reference_step, params, target_params, batch, weights)
    executed = compiled_flops(step, params, target_params, batch, weights)
    rate = matmul_flops_per_second()
    step_seconds = median_seconds(run, repeats=args.repeats)
    rate = max(rate, matmul_flops_per_second())  # before and after: the best of both
    floor_seconds = flops / rate
    print(f"devices: {jax.local_device_count()} ({jax.devices()[0].platform})")
    print(
        f"step: {'DQN' if args.dqn else 'Double DQN'} batch {batch_size}, {flops / 1e9:.3f} GFLOP"
        f" (native-conv formulation; the shifted-matmul step executes {executed / 1e9:.3f})"
    )
    print(
        f"matmul rate: {rate / 1e9:.1f} GFLOP/s; "
        f"step rate: {flops / step_seconds / 1e9:.1f} GFLOP/s"
    )
    print(result_line("learner_step", step_seconds * 1e3, floor_seconds * 1e3))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, LearnerStepArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
