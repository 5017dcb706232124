"""Benchmark: acting throughput, the jitted epsilon-greedy policy plus envpool Pong.

Figure: env steps/s of the actor loop a bundle runs (policy on the observation batch,
actions sent to envpool, observations received, newest frames handed to replay).
Floor: raw envpool with random actions and the same `num_envs`, measured in the same run.
Here the ratio is value/floor and higher is better (goal: at least 0.85).

    python benchmarks/acting.py [--num-envs 8] [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import jax
import numpy as np
from common import raw_envpool_rate, result_line

from gorila_jax.core import cli
from gorila_jax.core.actor import make_policy
from gorila_jax.core.config import Config
from gorila_jax.core.networks import make_network
from gorila_jax.envs import make_env


@dataclasses.dataclass(frozen=True)
class ActingArgs:
    """Time the acting loop against raw envpool."""

    num_envs: int = 8
    """Envs stepped together (the same for the policy loop and raw envpool)."""
    steps: int = 400
    """Vector steps timed per measurement."""
    repeats: int = 3
    """Measurements of each, interleaved; the medians are compared."""


def actor_rate(config: Config, steps: int) -> float:
    """Env steps/s of policy + envpool, as in the bundle loop (without learning)."""
    env = make_env(config, seed=1)
    network = make_network(config, env.num_actions)
    step = env.reset()
    params = network.init(jax.random.key(0), step.obs)
    policy = make_policy(network)
    key = jax.random.key(1)

    def act(step, key):
        actions, key = policy(params, step.obs, key, 0.05)
        actions = np.asarray(actions)
        env.newest_frame(step.obs)
        env.send(actions)
        step, _ = env.recv()
        return step, key

    for _ in range(20):
        step, key = act(step, key)
    start = time.perf_counter()
    for _ in range(steps):
        step, key = act(step, key)
    seconds = time.perf_counter() - start
    env.close()
    return steps * config.num_envs / seconds


def benchmark(args: ActingArgs) -> int:
    config = dataclasses.replace(Config(), num_envs=args.num_envs)
    raw, actor = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        raw.append(raw_envpool_rate(config, args.steps))
        actor.append(actor_rate(config, args.steps))
    print(f"raw envpool (random actions): {[round(r) for r in raw]} env steps/s")
    print(f"policy + envpool:             {[round(r) for r in actor]} env steps/s")
    print("higher is better; goal: ratio >= 0.85")
    print(result_line("acting", statistics.median(actor), statistics.median(raw)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ActingArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
