"""Benchmark of the replay memory: bytes per stored Atari transition and batch sampling time.

Run from the repository root: `python benchmarks/replay.py [capacity]`. It fills an Atari-shaped
replay (84x84 uint8 frames, stack 4, 8 envs), then reports, each next to a floor measured in the
same run: bytes per stored transition (floor: one 84x84 frame), the median time to add one vector
step (floor: copying the same frames into a preallocated array), and the median time to sample a
batch of 32 uniformly and with priorities (floor: a plain numpy fancy-index gather of the same
number of frame bytes, 32 * 2 stacks * 4 frames, from fresh random rows of a contiguous array of
the same size).
The last line is `RESULT replay_bytes value=<bytes> floor=7056 ratio=<value/7056>`.
"""

import dataclasses
import sys
import time
from typing import Annotated

import numpy as np
import tyro

from gorila_jax.core import cli
from gorila_jax.core.replay import PrioritizedReplay, Replay

FRAME_SHAPE = (84, 84)
FRAME_BYTES = 84 * 84
NUM_ENVS = 8
STACK_SIZE = 4
N_STEP = 3
NUM_ACTIONS = 18
BATCH_SIZE = 32
REPETITIONS = 200


@dataclasses.dataclass(frozen=True)
class ReplayArgs:
    """Time an Atari-shaped replay: bytes per transition, add and sample times."""

    capacity: Annotated[tyro.conf.Positional[int], tyro.conf.arg(metavar="[CAPACITY]")] = 100_000
    """Transitions the replays hold (over all envs)."""


def median_seconds(function, repetitions: int = REPETITIONS) -> float:
    """Median wall time of `function()` over `repetitions` calls (after one warm-up call)."""
    function()
    durations = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        durations.append(time.perf_counter() - start)
    return float(np.median(durations))


def fill(replay: Replay, rng: np.random.Generator) -> float:
    """Fill the replay with episodes of random length; returns the median add time in seconds."""
    frames = rng.integers(0, 256, size=(NUM_ENVS, *FRAME_SHAPE), dtype=np.uint8)
    previous_last = np.ones(NUM_ENVS, dtype=bool)
    durations = []
    for _ in range(replay.capacity_per_env + 10):
        first = previous_last
        terminated = ~first & (rng.random(NUM_ENVS) < 0.005)
        truncated = np.zeros(NUM_ENVS, dtype=bool)
        actions = rng.integers(0, NUM_ACTIONS, size=NUM_ENVS)
        rewards = rng.random(NUM_ENVS).astype(np.float32)
        start = time.perf_counter()
        replay.add(frames, actions, rewards, terminated, truncated, first)
        durations.append(time.perf_counter() - start)
        previous_last = terminated
    return float(np.median(durations))


def report(name: str, value: float, floor: float) -> None:
    """Print one `name value=... floor=... ratio=...` line."""
    print(f"{name} value={value:.4f} floor={floor:.4f} ratio={value / floor:.2f}")


def measure_floors(capacity: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median seconds of the plain-numpy floors: (gather of 256 frames, write of 8 frames)."""
    frames = np.zeros((capacity, *FRAME_SHAPE), dtype=np.uint8)
    frames[:] = 1  # touch every page, like a filled replay
    # Fresh random rows on every call, as in sampling, so neither side reads from a warm cache.
    num_rows = BATCH_SIZE * 2 * STACK_SIZE
    gather_rows = iter(rng.integers(0, capacity, size=(REPETITIONS + 1, num_rows)))
    gather_floor = median_seconds(lambda: frames[next(gather_rows)])
    ring_starts = np.arange(NUM_ENVS) * (capacity // NUM_ENVS)
    write_rows = iter(ring_starts + step for step in range(REPETITIONS + 1))
    new_frames = rng.integers(0, 256, size=(NUM_ENVS, *FRAME_SHAPE), dtype=np.uint8)

    def write_frames():
        frames[next(write_rows)] = new_frames

    return gather_floor, median_seconds(write_frames)


def measure_replay(replay: Replay, rng: np.random.Generator) -> tuple[float, float, float]:
    """Fill `replay`; return (median add seconds, median sample seconds, bytes per transition)."""
    add_seconds = fill(replay, rng)
    sample_seconds = median_seconds(lambda: replay.sample(BATCH_SIZE))
    return add_seconds, sample_seconds, replay.nbytes / replay.capacity


def benchmark(args: ReplayArgs) -> int:
    """Build, fill and time the replays, then print the result lines."""
    capacity = args.capacity
    rng = np.random.default_rng(0)
    common = dict(
        capacity=capacity,
        num_envs=NUM_ENVS,
        frame_shape=FRAME_SHAPE,
        frame_dtype=np.uint8,
        stack_size=STACK_SIZE,
        n_step=N_STEP,
        gamma=0.99,
        num_actions=NUM_ACTIONS,
        seed=0,
    )
    gather_floor, add_floor = measure_floors(capacity, rng)
    uniform_add, uniform_sample, uniform_bytes = measure_replay(Replay(**common), rng)
    prioritized_add, prioritized_sample, prioritized_bytes = measure_replay(
        PrioritizedReplay(**common, beta_steps=10_000), rng
    )

    ms = 1e3
    report("add_step_uniform_ms", uniform_add * ms, add_floor * ms)
    report("add_step_prioritized_ms", prioritized_add * ms, add_floor * ms)
    report("sample_batch32_uniform_ms", uniform_sample * ms, gather_floor * ms)
    report("sample_batch32_prioritized_ms", prioritized_sample * ms, gather_floor * ms)
    print(
        f"replay_bytes_uniform value={uniform_bytes:.1f} floor={FRAME_BYTES} "
        f"ratio={uniform_bytes / FRAME_BYTES:.4f}"
    )
    print(
        f"RESULT replay_bytes value={prioritized_bytes:.1f} floor={FRAME_BYTES} "
        f"ratio={prioritized_bytes / FRAME_BYTES:.4f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ReplayArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
