"""Benchmark of replay checkpoints: size, save and load time of a full Pong replay.

    python benchmarks/replay_checkpoint.py [--capacity 100000] [--repeats 3]

Fills a replay of the Pong defaults (capacity 100,000, 8 envs) with real Pong frames from
envpool under a random policy, then times `ReplayCheckpointer.save` (zip of .npy members,
deflate level 1, fsync, rename) and `restore` (CRC-checked read, validation, copy into the
replay). Floor: writing the same arrays uncompressed (`np.save` into one file, fsync), the
cost of putting the bytes on this disk at all, measured in the same run. Ends with
`RESULT replay_checkpoint_save value=<s> floor=<s> ratio=<value/floor>`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import result_line

from gorila_jax.bundle.loop import LoopCounters, make_replay
from gorila_jax.bundle.replay_checkpoint import ReplayCheckpointer
from gorila_jax.core import cli
from gorila_jax.core.config import Config
from gorila_jax.envs import make_env


@dataclasses.dataclass(frozen=True)
class ReplayCheckpointArgs:
    """Time saving and loading a full Pong replay against writing its bytes uncompressed."""

    capacity: int = Config().replay_capacity
    """Transitions in the replay (the Pong config's replay_capacity)."""
    repeats: int = 3
    """Saves and loads timed; the medians are reported."""


def fill_with_pong(config: Config):
    """A full replay of real Pong frames (random actions) and an empty twin to load into."""
    env = make_env(config, seed=0)
    replay = make_replay(config, env, seed=0)
    twin = make_replay(config, env, seed=1)
    rng = np.random.default_rng(0)
    step = env.reset()
    adds = replay.capacity // env.num_envs + 10
    for _ in range(adds):
        actions = rng.integers(0, env.num_actions, env.num_envs)
        replay.add(
            env.newest_frame(step.obs),
            actions,
            step.reward,
            step.terminated,
            step.truncated,
            step.first,
        )
        step, _ = env.step(actions)
    env.close()
    return replay, twin


def raw_write_seconds(replay, directory: Path) -> float:
    """Seconds to write the replay's arrays uncompressed to one file and fsync it."""
    arrays, _ = replay.state()
    path = directory / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for array in arrays.values():
            np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def benchmark(args: ReplayCheckpointArgs) -> int:
    config = dataclasses.replace(Config(), replay_capacity=args.capacity)
    started = time.perf_counter()
    replay, target = fill_with_pong(config)
    print(f"filled {len(replay):,} transitions in {time.perf_counter() - started:.1f} s")
    save_times, load_times, raw_times = [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        directory = Path(tmp)
        saver = ReplayCheckpointer(directory / "replay", keep=1, expect={"bench": 1})
        for repeat in range(args.repeats):
            raw_times.append(raw_write_seconds(replay, directory))
            start = time.perf_counter()
            saver.save(replay, LoopCounters(repeat, repeat, 0, (0, 0)))
            save_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert saver.restore(target) is not None
            load_times.append(time.perf_counter() - start)
        size = saver.last_bytes
        raw = saver.last_raw_bytes
    save, load, floor = (statistics.median(t) for t in (save_times, load_times, raw_times))
    print(f"replay of {len(replay):,} transitions: {raw / 1e6:,.0f} MB in memory, "
          f"{size / 1e6:,.1f} MB on disk ({raw / size:.0f}x smaller)")  # fmt: skip
    print(f"save {save:.2f} s, load {load:.2f} s (medians of {args.repeats}); "
          f"floor: the same bytes written uncompressed {floor:.2f} s")  # fmt: skip
    print(result_line("replay_checkpoint_save", save, floor))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ReplayCheckpointArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
