"""Helpers shared by the benchmarks: timing medians, the matmul-rate floor, result lines."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn()` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(size: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul rate of this machine through XLA (FLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats=repeats)
    return 2.0 * size**3 / seconds


def compiled_flops(jitted: Callable, *args) -> float:
    """FLOPs of one call of a jitted function, from XLA's cost analysis."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def raw_envpool_rate(config, steps: int, warmup: int = 20) -> float:
    """Env steps/s of the config's envs alone, stepped with uniformly random actions."""
    import numpy as np

    from gorila_jax.envs import make_env

    env = make_env(config, seed=1)
    rng = np.random.default_rng(0)
    env.reset()
    for _ in range(warmup):
        env.step(rng.integers(0, env.num_actions, env.num_envs))
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, env.num_actions, env.num_envs))
    seconds = time.perf_counter() - start
    env.close()
    return steps * env.num_envs / seconds


def result_line(name: str, value: float, floor: float) -> str:
    """The closing line every benchmark prints: figure, floor and their ratio."""
    return f"RESULT {name} value={value:.6g} floor={floor:.6g} ratio={value / floor:.4g}"
