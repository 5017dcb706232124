"""Soak benchmark: a local Gorila run for N minutes, resident memory of every process over time.

Starts the local launcher (experiments/cartpole.py or experiments/pong.py) with a frame budget
that never runs out, and every `--interval` seconds records the RSS of the launcher and of each
child, named by its GORILA_PROCESS_ID (0 = server, i = bundle i). Each bundle's replay is
allocated up front but its pages are only touched as the ring fills, so RSS grows until every
bundle's replay is full; after that it must stay flat. Replay is full once each bundle has
made `replay_capacity` agent steps (its frames / frames per step: 1 for CartPole, 4 for Atari),
read from the bundles' progress lines (or RUN_DIR/ps.json when there are none).

Per process, over the samples after replay is full: the growth (last - value at full) in MB
and MB/min, and the least-squares slope in MB/min (the figure). Floor: the measurement noise,
the median absolute step-to-step RSS change during that phase (at least one 4 KiB page),
spread over the phase's length: the drift rate that would add up to one step of noise over
the whole window. Lower is better; a ratio below 1 means the drift is below the noise. The
RESULT line gives the largest slope over the processes and that process's floor. Verdict:
"flat" if every process's slope times the full-replay window is below 2% of its RSS at full.

At the end the run is stopped with SIGINT (the launcher stops every process) and the script
checks that no process is left. Writes soak.csv (time_s, process, pid, rss_mb), soak.png and
the run's output (run.log) into --out; the run directory is OUT/run.

    python benchmarks/soak.py [--minutes 3] [--env cartpole|pong] [--interval 2] [--out DIR]
    python benchmarks/soak.py --env pong --replay-capacity 5000 -- --num-envs 4
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import psutil
from common import ROOT, result_line

from gorila_jax.core import cli

ENV_PROCESS_ID = "GORILA_PROCESS_ID"
HUGE_FRAMES = 10**12
PAGE_MB = 4096 / 2**20
FLAT_FRACTION = 0.02
STOP_TIMEOUT_SECONDS = 120.0
PROGRESS_LINE = re.compile(r"^\[bundle (\d+)\] frames ([\d,]+)/")


@dataclass(frozen=True)
class EnvSetup:
    script: str
    frames_per_step: int
    replay_capacity: int
    extra: tuple[str, ...]


EnvName = Literal["cartpole", "pong"]
ENVS: dict[EnvName, EnvSetup] = {
    "cartpole": EnvSetup("experiments/cartpole.py", 1, 20_000, ()),
    # Learning starts well before the ring is full, so the learner is warm by then.
    "pong": EnvSetup("experiments/pong.py", 4, 20_000, ("--learning-starts", "8000")),
}


@dataclass
class RunOutput:
    """The launcher's merged output, saved to a file, with each bundle's latest frame count."""

    log_path: Path
    bundle_frames: dict[int, int] = field(default_factory=dict)
    lines: int = 0

    def follow(self, stream) -> threading.Thread:
        def read() -> None:
            with self.log_path.open("w") as log:
                for line in stream:
                    log.write(line)
                    log.flush()
                    self.lines += 1
                    match = PROGRESS_LINE.match(line)
                    if match:
                        frames = int(match.group(2).replace(",", ""))
                        self.bundle_frames[int(match.group(1))] = frames

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread


@dataclass(frozen=True)
class SoakArgs:
    """Soak a local run and record the RSS of its processes."""

    minutes: float = 3.0
    """length of the run"""
    env: EnvName = "cartpole"
    """Launcher to run: experiments/cartpole.py or experiments/pong.py."""
    interval: float = 2.0
    """seconds between samples"""
    out: Path = ROOT / "runs" / "soak"
    """Directory for soak.csv, soak.png and run.log; the run directory is OUT/run."""
    workers: int = 2
    """bundle processes"""
    replay_capacity: int | None = None
    """per bundle (default: per env)"""


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """The soak's own flags and, after `--`, those passed on to the launcher as they are."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def process_name(process: psutil.Process, launcher_pid: int) -> str:
    """launcher, server, bundle<i>, or the command name and pid of anything else."""
    if process.pid == launcher_pid:
        return "launcher"
    index = process.environ().get(ENV_PROCESS_ID)
    if index is None:
        return f"{process.name()}{process.pid}"
    return "server" if index == "0" else f"bundle{index}"


def replay_full(
    output: RunOutput, run_dir: Path, workers: int, capacity: int, frames_per_step: int
) -> bool:
    """Whether every bundle has made at least `capacity` agent steps (its ring has wrapped)."""
    if output.bundle_frames:
        if len(output.bundle_frames) < workers:
            return False
        return min(output.bundle_frames.values()) // frames_per_step >= capacity
    try:
        total = json.loads((run_dir / "ps.json").read_text())["frames"]
    except (OSError, ValueError, KeyError):
        return False
    # Only the sum is there; assume the bundles run at the same speed.
    return total // (workers * frames_per_step) >= capacity


def stop_run(launcher: subprocess.Popen, seen: dict[int, tuple[str, float]]) -> list[str]:
    """SIGINT the launcher, wait for it, and list every process of the run still alive."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.wait(timeout=STOP_TIMEOUT_SECONDS)  # if not, it is killed below
    left = []
    for pid, (name, created) in seen.items():
        try:
            process = psutil.Process(pid)
            alive = process.create_time() == created and process.status() != "zombie"
        except psutil.NoSuchProcess:
            continue
        if alive:
            left.append(f"{name} (pid {pid})")
            process.kill()
    return left


@dataclass
class Growth:
    name: str
    rss_at_full: float
    rss_last: float
    window_minutes: float
    slope: float  # MB/min, least squares over the full-replay phase
    slope_stderr: float
    robust_slope: float  # MB/min, Theil-Sen (median pairwise slope): ignores one-off steps
    noise: float  # MB, median |step-to-step change|, at least one page
    floor: float  # MB/min: noise spread over the window

    @property
    def growth(self) -> float:
        return self.rss_last - self.rss_at_full

    @property
    def flat(self) -> bool:
        return self.slope * self.window_minutes < FLAT_FRACTION * self.rss_at_full


def growth_after(name: str, times: np.ndarray, rss: np.ndarray) -> Growth | None:
    """Fit RSS (MB) against time (s) over samples taken after replay was full."""
    if len(times) < 3:
        return None
    minutes = (times - times[0]) / 60.0
    window = float(minutes[-1])
    slope, intercept = np.polyfit(minutes, rss, 1)
    residuals = rss - (slope * minutes + intercept)
    spread = float(np.sum((minutes - minutes.mean()) ** 2))
    stderr = float(np.sqrt(np.sum(residuals**2) / (len(times) - 2) / spread))
    later, earlier = np.triu_indices(len(times), k=1)[::-1]
    pairwise = (rss[later] - rss[earlier]) / (minutes[later] - minutes[earlier])
    noise = max(statistics.median(np.abs(np.diff(rss)).tolist()), PAGE_MB)
    return Growth(
        name=name,
        rss_at_full=float(rss[0]),
        rss_last=float(rss[-1]),
        window_minutes=window,
        slope=float(slope),
        slope_stderr=stderr,
        robust_slope=float(np.median(pairwise)),
        noise=noise,
        floor=noise / window,
    )


def plot(
    samples: list[tuple[float, str, int, float]], full_time: float | None, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, name, _, rss in samples:
        series[name].append((t / 60.0, rss))
    names = sorted(series, key=lambda n: (n != "launcher", n != "server", n))
    fig, axes = plt.subplots(
        len(names), 1, sharex=True, figsize=(8, 2.2 * len(names) + 0.8), squeeze=False
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        t, rss = zip(*series[name], strict=True)
        ax.plot(t, rss, marker=".", markersize=3, linewidth=1)
        if full_time is not None:
            ax.axvline(full_time / 60.0, color="gray", linestyle="--", label="replay full")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel(f"{name}\nRSS (MB)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time since start (min)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak(args: SoakArgs, extra: list[str]) -> int:
    setup = ENVS[args.env]
    capacity = args.replay_capacity or setup.replay_capacity
    out = args.out.resolve()
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: an old checkpoint there would be resumed
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / setup.script),
        "--run-dir",
        str(run_dir),
        "--total-frames",
        str(HUGE_FRAMES),
        "--replay-capacity",
        str(capacity),
        "--workers",
        str(args.workers),
        "--log-every-seconds",
        str(args.interval),
        *setup.extra,
        *extra,
    ]
    print("soak: " + " ".join(command[1:]), flush=True)
    start = time.monotonic()
    launcher = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a Ctrl-C here reaches the run only through stop_run
    )
    output = RunOutput(out / "run.log")
    reader = output.follow(launcher.stdout)
    samples: list[tuple[float, str, int, float]] = []
    seen: dict[int, tuple[str, float]] = {}  # pid -> (name, create_time)
    full_time: float | None = None
    died = None
    deadline = start + 60.0 * args.minutes
    try:
        while time.monotonic() < deadline:
            now = time.monotonic() - start
            code = launcher.poll()
            if code is not None:
                died = code
                break
            try:
                processes = [psutil.Process(launcher.pid)]
                processes += processes[0].children(recursive=True)
            except psutil.NoSuchProcess:
                processes = []
            for process in processes:
                try:
                    if process.pid not in seen:
                        seen[process.pid] = (
                            process_name(process, launcher.pid),
                            process.create_time(),
                        )
                    rss = process.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                samples.append((now, seen[process.pid][0], process.pid, rss))
            if full_time is None and replay_full(
                output, run_dir, args.workers, capacity, setup.frames_per_step
            ):
                full_time = now
                print(
                    f"soak: replay full at {now:.0f}s ({output.bundle_frames or 'ps.json'})",
                    flush=True,
                )
            time.sleep(max(0.0, args.interval - (time.monotonic() - start - now)))
    finally:
        left = stop_run(launcher, seen)
        reader.join(timeout=10)
    code = launcher.returncode

    with (out / "soak.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["time_s", "process", "pid", "rss_mb"])
        for t, name, pid, rss in samples:
            writer.writerow([f"{t:.2f}", name, pid, f"{rss:.3f}"])
    title = (
        f"Soak: {args.env}, {args.workers} bundle(s), replay {capacity:,} per bundle, "
        f"{args.minutes:g} min"
    )
    plot(samples, full_time, out / "soak.png", title)
    print(
        f"soak: {len(samples)} samples of {len({s[1] for s in samples})} processes; "
        f"wrote {out / 'soak.csv'}, {out / 'soak.png'}, {output.log_path}"
    )
    print(
        f"soak: launcher exit status {code} (130 = stopped by SIGINT); processes left: "
        f"{', '.join(left) if left else 'none'}"
    )
    if died is not None:
        print(f"error: the run ended by itself with status {died} (see {output.log_path})")
        return 1
    if full_time is None:
        print(
            f"error: replay never full in {args.minutes:g} min (bundle frames "
            f"{output.bundle_frames}); run longer or lower --replay-capacity"
        )
        return 1

    by_name: dict[str, list[tuple[float, float]]] = defaultdict(list)
    pids: dict[str, set[int]] = defaultdict(set)
    for t, name, pid, rss in samples:
        pids[name].add(pid)
        if t >= full_time:
            by_name[name].append((t, rss))
    results = []
    for name in sorted(by_name):
        if len(pids[name]) > 1:
            print(f"warning: {name} was restarted (pids {sorted(pids[name])}); its fit spans both")
        points = np.array(by_name[name])
        result = growth_after(name, points[:, 0], points[:, 1])
        if result is None:
            print(f"warning: {name}: fewer than 3 samples after replay was full")
            continue
        results.append(result)
        print(
            f"{name}: RSS {result.rss_at_full:.1f} MB at full -> {result.rss_last:.1f} MB "
            f"after {result.window_minutes:.2f} min: growth {result.growth:+.2f} MB "
            f"({result.growth / result.window_minutes:+.3f} MB/min); fit slope "
            f"{result.slope:+.3f} +- {result.slope_stderr:.3f} MB/min (Theil-Sen "
            f"{result.robust_slope:+.3f}); noise "
            f"{result.noise:.3f} MB per {args.interval:g}s step"
        )
    if not results:
        print("error: no process had enough samples after replay was full")
        return 1
    for result in results:
        print(f"soak_rss_growth_{result.name} value={result.slope:.4g} floor={result.floor:.4g}")
    worst = max(results, key=lambda r: r.slope)
    growing = [r for r in results if not r.flat]
    if growing:
        names = ", ".join(
            f"{r.name} +{r.slope * r.window_minutes:.1f} MB over {r.window_minutes:.1f} min "
            f"= {100 * r.slope * r.window_minutes / r.rss_at_full:.1f}% of its RSS"
            for r in growing
        )
        print(f"verdict: growing ({names}; limit {100 * FLAT_FRACTION:g}%)")
    else:
        share = max(r.slope * r.window_minutes / r.rss_at_full for r in results)
        print(
            f"verdict: flat (largest fitted growth over the window {100 * max(share, 0):.2f}% "
            f"of a process's RSS; limit {100 * FLAT_FRACTION:g}%)"
        )
    print("lower is better; ratio < 1: drift below one step of measurement noise per window")
    print(result_line("soak_rss_growth", worst.slope, worst.floor))
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and soak; the exit status."""
    own, extra = split_extra(list(sys.argv[1:] if argv is None else argv))
    description = __doc__.splitlines()[0]
    return cli.run(lambda args: soak(args, extra), SoakArgs, own, description=description)


if __name__ == "__main__":
    sys.exit(main())
