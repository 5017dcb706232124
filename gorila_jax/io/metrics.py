"""Run logs: finished episodes to CSV, learner windows to JSONL, TensorBoard event files, and
the progress line.

TensorBoard events (tensorboardX) go into the logger's directory itself, so
`tensorboard --logdir RUN_DIR` shows a single-process run as one run and a distributed one as
bundle1, bundle2, ...: per episode `episode/return` (unclipped, whole game) and
`episode/length` (agent steps), per learner window `learner/loss`, `learner/mean_q`,
`learner/mean_abs_td`, `learner/q_spread` (and `learner/updates`), all against environment
frames.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from gorila_jax.envs import Episode

log = logging.getLogger(__name__)

EPISODE_FIELDS = ("time", "frames", "bundle", "env", "return", "length")


def format_duration(seconds: float) -> str:
    """Seconds as a short h/m/s string (e.g. 1h02m, 3m05s, 12s)."""
    if not np.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


TENSORBOARD_FLUSH_SECONDS = 10


def open_tensorboard(log_dir: Path):
    """A tensorboardX SummaryWriter for `log_dir`, or None (with a note) when unavailable."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as error:
        log.warning(f"no TensorBoard events ({error})")
        return None
    return SummaryWriter(logdir=str(log_dir), flush_secs=TENSORBOARD_FLUSH_SECONDS)


def read_episodes(path: Path) -> dict[str, np.ndarray]:
    """Columns of an episodes.csv as float arrays; malformed rows (a half-written line) skipped."""
    columns: dict[str, list[float]] = {"time": [], "frames": [], "return": [], "length": []}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                values = {key: float(row[key]) for key in columns}
            except (KeyError, TypeError, ValueError):
                continue
            if all(np.isfinite(v) for v in values.values()):
                for key, value in values.items():
                    columns[key].append(value)
    return {key: np.asarray(values, np.float64) for key, values in columns.items()}


class RunLogger:
    """Appends episodes to `episodes.csv` and learner metrics to `learner.jsonl` in the run dir,
    and writes both to TensorBoard event files there (unless `tensorboard=False`).

    Files are opened in append mode, so a resumed run keeps its history (TensorBoard starts
    a new event file beside the old ones) and its recent returns.
    """

    def __init__(
        self, run_dir: Path, *, bundle: int = 0, recent: int = 20, tensorboard: bool = True
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.bundle = bundle
        self.start = time.time()
        episodes_path = run_dir / "episodes.csv"
        new_file = not episodes_path.exists() or episodes_path.stat().st_size == 0
        self._episodes_file = episodes_path.open("a", newline="")
        self._episodes = csv.writer(self._episodes_file)
        if new_file:
            self._episodes.writerow(EPISODE_FIELDS)
        self._learner_file = (run_dir / "learner.jsonl").open("a")
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=recent)
        if not new_file:  # a resumed run shows its recent return from the start, not nan
            try:
                self.recent_returns.extend(read_episodes(episodes_path)["return"][-recent:])
            except (OSError, UnicodeDecodeError, csv.Error) as error:
                log.warning(f"{episodes_path}: recent returns not read back ({error})")
        self.episode_count = 0
        self._tensorboard = open_tensorboard(run_dir) if tensorboard else None

    def episodes(self, finished: list[Episode], frames: int) -> None:
        """Record episodes that ended at `frames`."""
        now = round(time.time() - self.start, 3)
        for episode in finished:
            self._episodes.writerow(
                (
                    now,
                    frames,
                    self.bundle,
                    episode.env_index,
                    episode.episode_return,
                    episode.length,
                )
            )
            self.recent_returns.append(episode.episode_return)
            self.episode_count += 1
            if self._tensorboard is not None:
                self._tensorboard.add_scalar("episode/return", episode.episode_return, frames)
                self._tensorboard.add_scalar("episode/length", episode.length, frames)
        if finished:
            self._episodes_file.flush()

    def learner(self, record: dict) -> None:
        """Record one window of learner statistics."""
        record = {"time": round(time.time() - self.start, 3), **record}
        self._learner_file.write(json.dumps(record) + "\n")
        self._learner_file.flush()
        if self._tensorboard is not None:
            frames = record.get("frames")
            for key, value in record.items():
                if key not in ("time", "frames") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(f"learner/{key}", value, frames)

    def mean_recent_return(self) -> float:
        """Mean return of the last `recent` episodes (nan before the first one)."""
        return float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")

    def close(self) -> None:
        """Flush and close the files."""
        self._episodes_file.close()
        self._learner_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class Progress:
    """The live status: frames, env steps/s, server updates/s, epsilon, return, elapsed, ETA.

    On a terminal the line is redrawn in place about once a second; otherwise (SLURM logs,
    the local launcher's pipes) a plain line is printed every `every` seconds. A resumed
    run passes its restored counters (`start_frames`, `start_agent_steps`) so that its
    first rates count only what this sitting did.
    """

    def __init__(
        self,
        total_frames: int,
        every: float,
        *,
        prefix: str = "",
        stream=None,
        start_frames: int = 0,
        start_agent_steps: int = 0,
    ):
        self.total_frames = total_frames
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = min(every, 1.0) if self.live else every
        self.prefix = prefix
        self.start = time.time()
        self._last_time = self.start
        self._last_frames = start_frames
        self._last_steps = start_agent_steps
        self._last_version: int | None = None

    def maybe_print(
        self,
        *,
        frames: int,
        agent_steps: int,
        epsilon: float,
        mean_return: float,
        updates: int,
        server_version: int | None = None,
        force: bool = False,
    ) -> bool:
        """Print when `every` seconds have passed (or `force`); return whether it printed."""
        now = time.time()
        if not force and now - self._last_time < self.every:
            return False
        window = max(now - self._last_time, 1e-9)
        steps_per_second = (agent_steps - self._last_steps) / window
        frames_per_second = (frames - self._last_frames) / window
        eta = (self.total_frames - frames) / frames_per_second if frames_per_second > 0 else np.inf
        server = ""
        if server_version is not None:
            if self._last_version is not None:
                server = f" | server {(server_version - self._last_version) / window:,.0f} upd/s"
            self._last_version = server_version
        line = (
            f"{self.prefix}frames {frames:,}/{self.total_frames:,} | sps {steps_per_second:,.0f}"
            f"{server} | eps {epsilon:.3f} | return(recent) {mean_return:.2f}"
            f" | updates {updates:,} | elapsed {format_duration(now - self.start)}"
            f" | eta {format_duration(eta)}"
        )
        if self.live:
            print(f"\r{line}\x1b[K", end="\n" if force else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
        self._last_time, self._last_frames, self._last_steps = now, frames, agent_steps
        return True
