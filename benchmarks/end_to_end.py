"""Benchmark: env steps/s on Pong while learning (single process, the bundle's own loop).

Batch 32 and one learner step per 4 env steps (summed over the envs, as CleanRL's
dqn_atari_jax.py with one env). Figure: env steps/s over a timed window once learning has
started and everything is compiled. Floor: the rate if the only costs were raw envpool
stepping (random actions, same num_envs) and the learner step at its floor (FLOPs of the
native-conv step / matmul rate), both measured in the same run:

    floor = 1 / (1 / raw_envpool_rate + learner_floor_seconds / train_every)

Here the ratio is value/floor and higher is better; the goal is a value of at least 150.

    python benchmarks/end_to_end.py [--frames 8000] [--dqn]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from common import compiled_flops, matmul_flops_per_second, raw_envpool_rate, result_line

from gorila_jax.bundle.loop import make_replay, run_actor_learner
from gorila_jax.core import cli
from gorila_jax.core.config import Config
from gorila_jax.core.learner import local_mesh, make_grad_step
from gorila_jax.core.model import Model
from gorila_jax.core.networks import NatureCNNReference
from gorila_jax.core.replay import Transition
from gorila_jax.envs import make_env
from gorila_jax.run.single_process import LocalLearner


@dataclasses.dataclass(frozen=True)
class EndToEndArgs:
    """Time single-process learning on Pong against its floor."""

    frames: int = 8_000
    """timed window, in frames"""
    dqn: bool = False
    """plain DQN target, as CleanRL"""
    num_envs: int = 8
    """Envs stepped together (the same for the run and raw envpool)."""


def learner_floor_seconds(config: Config, num_actions: int) -> float:
    """FLOPs of the native-conv learner step at batch_size / measured matmul rate."""
    rng = np.random.default_rng(0)
    size = config.batch_size
    frames = lambda: rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8)  # noqa: E731
    batch = Transition(
        frames(),
        rng.integers(0, num_actions, size).astype(np.int32),
        np.zeros((size, config.n_step), np.float32),
        np.full((size, config.n_step), config.gamma, np.float32),
        frames(),
    )
    network = NatureCNNReference(num_actions=num_actions)
    params = network.init(jax.random.key(0), batch.obs_tm1)
    step = make_grad_step(network, double_dqn=config.double_dqn, huber_delta=1.0, mesh=local_mesh())
    flops = compiled_flops(step, params, params, batch, np.ones(size, np.float32))
    return flops / matmul_flops_per_second()


def benchmark(args: EndToEndArgs) -> int:
    config = dataclasses.replace(
        Config(),
        num_envs=args.num_envs,
        double_dqn=not args.dqn,
        replay_capacity=20_000,
        learning_starts=2_000,
        epsilon_decay_frames=10_000,
        log_every_seconds=1e9,
    )
    env = make_env(config, seed=0)
    replay = make_replay(config, env, seed=0)
    model = Model.from_env(config, env)
    network = model.network
    learner = LocalLearner(config, network, model.init(0), seed=0)
    with tempfile.TemporaryDirectory() as run_dir:
        warmup = config.learning_starts + 2_000
        run_actor_learner(config, learner, env, replay, seed=0, run_dir=Path(run_dir),
                          frame_budget=warmup)  # fmt: skip
        timed = dataclasses.replace(config, learning_starts=0)
        before = learner.updates
        result = run_actor_learner(timed, learner, env, replay, seed=1, run_dir=Path(run_dir),
                                   frame_budget=args.frames)  # fmt: skip
    jax.block_until_ready(learner.params)
    env.close()
    rate = result.agent_steps / result.seconds
    updates = learner.updates - before
    raw = raw_envpool_rate(config, steps=300)
    learner_floor = learner_floor_seconds(config, env.num_actions)
    floor = 1.0 / (1.0 / raw + learner_floor / config.train_every)
    print(f"timed window: {result.agent_steps:,} env steps, {updates:,} learner steps, "
          f"{result.seconds:.1f}s; target {'DQN' if args.dqn else 'Double DQN'}")  # fmt: skip
    print(f"raw envpool: {raw:,.0f} env steps/s; learner floor: {learner_floor * 1e3:.1f} ms")
    print("higher is better; goal: value >= 150 env steps/s")
    print(result_line("end_to_end", rate, floor))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, EndToEndArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
