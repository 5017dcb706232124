"""Figures of finished or running runs: episode returns, learner statistics, server counters.

A run directory is read in either layout:

- single process: ``episodes.csv`` and ``learner.jsonl`` at the top;
- distributed: ``bundle*/episodes.csv`` and ``bundle*/learner.jsonl``, plus the server's
  ``ps.json`` (of a server split in shards: the whole server's figures plus a ``shards`` list
  of each shard's own, see gorila_jax.server.server_stats).

Bundles are merged in order of wall time. Each bundle logs time since its own start and
the frames it collected itself, so the x axis "frames" of a distributed run is the sum over
bundles of each bundle's frames at that moment (linearly interpolated between the points
each bundle logged). Nothing here trains or imports JAX; matplotlib draws off-screen.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.ticker import FuncFormatter

from gorila_jax.io.metrics import read_episodes
from gorila_jax.server.server_stats import read_run_stats

DPI = 100
RETURN_FIGSIZE = (10.0, 5.5)
PANEL_FIGSIZE = (15.0, 4.5)
WIDE_PANEL_FIGSIZE = (20.0, 4.5)  # four panels: the learner's, a sharded server's
SHARDED_PANEL_FIGSIZE = WIDE_PANEL_FIGSIZE  # the server figure with its 4th, per-shard, panel
RETURNS_BY_EPISODE = "returns_by_episode.png"
RETURNS_BY_FRAME = "returns_by_frame.png"
RETURNS_BY_HOUR = "returns_by_hour.png"
LEARNER = "learner.png"
SERVER = "server.png"
LEARNER_KEYS = (
    ("loss", "loss (Huber)"),
    ("mean_q", "mean Q"),
    ("mean_abs_td", "mean |TD error|"),
    ("q_spread", "Q spread over states (0: collapsed)"),
)
OPTIONAL_LEARNER_KEYS = frozenset({"q_spread"})
"""Keys that learner.jsonl files written before them lack: nan in those records."""


class PlotError(ValueError):
    """A run directory that cannot be plotted; the message is one line."""


@dataclass
class Run:
    """What the figures need from one run directory."""

    path: Path
    label: str
    time: np.ndarray  # seconds since the bundle started, per episode (merged order)
    frames: np.ndarray  # frames of the whole run when the episode ended
    returns: np.ndarray
    lengths: np.ndarray
    bundles: np.ndarray
    learner: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    server: dict | None = None


# ---- reading ------------------------------------------------------------------------------


def _bundle_number(path: Path) -> int:
    digits = re.sub(r"\D", "", path.name)
    return int(digits) if digits else 0


def _source_dirs(run_dir: Path) -> list[tuple[int | None, Path]]:
    """(bundle or None for the top level, directory) for each place that holds logs."""
    sources: list[tuple[int | None, Path]] = []
    if (run_dir / "episodes.csv").is_file() or (run_dir / "learner.jsonl").is_file():
        sources.append((None, run_dir))
    bundle_dirs = sorted(
        (p for p in run_dir.glob("bundle*") if p.is_dir()), key=lambda p: (_bundle_number(p), p)
    )
    sources += [(_bundle_number(p), p) for p in bundle_dirs]
    return sources


def _monotonic(times: np.ndarray) -> np.ndarray:
    """Times that restart from 0 (a resumed run appends to the same file) made increasing."""
    times = times.astype(np.float64).copy()
    offset = 0.0
    for i in range(1, len(times)):
        if times[i] + offset < times[i - 1]:
            offset = times[i - 1] - times[i]
        times[i] += offset
    return times


def _episode_clock(episodes: dict[str, np.ndarray], records: dict | None) -> np.ndarray:
    """Episode end times on one clock across sittings.

    Every sitting of a resumed run logs its time from 0 again. The learner's records come
    every few seconds, so joining its sittings end to end (`_monotonic`) loses only seconds;
    an episode's record may come 20 minutes into a sitting (a Pong game), so joining the
    episodes' sittings the same way would lose those minutes and misplace one bundle's
    episodes among another's. Frames run on across sittings, so an episode is placed at the
    learner's time for its frames; episodes before the learner's first record (the first
    sitting's warm-up) keep their own time, which is the first sitting's clock too.
    """
    if records is None or len(records["time"]) < 2:
        return _monotonic(episodes["time"])
    frames = np.maximum.accumulate(records["frames"].astype(np.float64))
    placed = np.interp(episodes["frames"], frames, records["time"])
    return np.where(episodes["frames"] >= frames[0], placed, episodes["time"])


def _learner_value(record: dict, key: str) -> float:
    if key in OPTIONAL_LEARNER_KEYS:
        return float(record.get(key, math.nan))
    return float(record[key])


def read_learner(path: Path) -> dict[str, np.ndarray]:
    """Columns of a learner.jsonl (time, frames and `LEARNER_KEYS`) as float arrays; a
    record without an optional key (an older run's) has nan there, one without another key
    (a half-written line) is skipped."""
    keys = ("time", "frames", *(key for key, _ in LEARNER_KEYS))
    columns: dict[str, list[float]] = {key: [] for key in keys}
    with path.open() as handle:
        for line in handle:
            try:
                record = json.loads(line)
                values = {key: _learner_value(record, key) for key in keys}
            except (ValueError, KeyError, TypeError):
                continue
            for key, value in values.items():
                columns[key].append(value)
    return {key: np.asarray(values, np.float64) for key, values in columns.items()}


def _frames_curve(
    episodes: dict[str, np.ndarray], learner: dict[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(time, frames) points of one bundle from everything it logged, starting at (0, 0)."""
    times = [np.zeros(1), episodes["time"]]
    frames = [np.zeros(1), episodes["frames"]]
    if learner is not None and len(learner["time"]):
        times.append(learner["time"])
        frames.append(learner["frames"])
    t, f = np.concatenate(times), np.concatenate(frames)
    order = np.argsort(t, kind="stable")
    return t[order], np.maximum.accumulate(f[order])


def load_run(run_dir: Path | str, label: str | None = None) -> Run:
    """Read one run directory (either layout); PlotError when it is missing or has no episodes."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise PlotError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise PlotError(f"not a directory: {run_dir}")
    label = label or run_dir.resolve().name
    per_source = []
    learner: dict[int, dict[str, np.ndarray]] = {}
    for bundle, directory in _source_dirs(run_dir):
        episodes_path = directory / "episodes.csv"
        learner_path = directory / "learner.jsonl"
        episodes = read_episodes(episodes_path) if episodes_path.is_file() else None
        records = read_learner(learner_path) if learner_path.is_file() else None
        if episodes is None:
            episodes = {k: np.zeros(0) for k in ("time", "frames", "return", "length")}
        if records is not None:
            records["time"] = _monotonic(records["time"])
            learner[0 if bundle is None else bundle] = records
        episodes["time"] = _episode_clock(episodes, records)
        per_source.append((0 if bundle is None else bundle, episodes, records))
    count = sum(len(e["return"]) for _, e, _ in per_source)
    if count == 0:
        raise PlotError(
            f"no episodes in {run_dir} (expected episodes.csv or bundle*/episodes.csv "
            "with at least one finished episode)"
        )
    curves = [_frames_curve(episodes, records) for _, episodes, records in per_source]

    def total_frames(at: np.ndarray) -> np.ndarray:
        return sum(
            (np.interp(at, t, f, left=0.0, right=f[-1]) for t, f in curves), np.zeros(len(at))
        )

    time = np.concatenate([e["time"] for _, e, _ in per_source])
    order = np.argsort(time, kind="stable")
    if len(per_source) == 1:
        frames = per_source[0][1]["frames"]
    else:
        frames = total_frames(time)
        for bundle_records in learner.values():
            bundle_records["total_frames"] = total_frames(bundle_records["time"])
    for bundle_records in learner.values():
        bundle_records.setdefault("total_frames", bundle_records["frames"])
    server = read_run_stats(run_dir)
    return Run(
        path=run_dir,
        label=label,
        time=time[order],
        frames=np.asarray(frames, np.float64)[order],
        returns=np.concatenate([e["return"] for _, e, _ in per_source])[order],
        lengths=np.concatenate([e["length"] for _, e, _ in per_source])[order],
        bundles=np.concatenate([np.full(len(e["return"]), b) for b, e, _ in per_source])[order],
        learner=learner,
        server=server,
    )


class Reached(NamedTuple):
    """Where a run's trailing mean return first reached a target (None fields: never)."""

    target: float
    window: int
    episode: int | None
    frames: float | None
    hours: float | None
    best_mean: float

    def __str__(self) -> str:
        if self.episode is None:
            return (
                f"the mean of the last {self.window} episodes never reached {self.target:g} "
                f"(best {self.best_mean:.2f})"
            )
        return (
            f"the mean of the last {self.window} episodes first reached {self.target:g} at "
            f"episode {self.episode:,}, {self.frames:,.0f} frames (Atari: 4 per agent step), "
            f"{self.hours:.2f} hours"
        )


def first_reaching(run: Run, target: float, window: int = 100) -> Reached:
    """The first episode at which the mean return of the last `window` finished episodes
    (all bundles, in order of wall time) is at least `target`, with its frames and hours."""
    returns = np.asarray(run.returns, np.float64)
    if len(returns) < window:
        best = float(returns.mean()) if len(returns) else float("nan")
        return Reached(target, window, None, None, None, best)
    means = np.convolve(returns, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(means >= target)
    if not len(hits):
        return Reached(target, window, None, None, None, float(means.max()))
    at = int(hits[0]) + window - 1
    return Reached(
        target, window, at + 1, float(run.frames[at]), float(run.time[at] / 3600.0),
        float(means.max()),
    )  # fmt: skip


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name; when two share a name, their parent's name is added."""
    names = [p.resolve().name or str(p) for p in paths]
    return [
        f"{p.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for p, name in zip(paths, names, strict=True)
    ]


# ---- drawing ------------------------------------------------------------------------------


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the mean of the last `window` values; fewer at the start)."""
    values = np.asarray(values, np.float64)
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _format_count(value: float, _position=None) -> str:
    magnitude = abs(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= scale:
            text = f"{value / scale:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{value:g}"


def _colors(count: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(count)]


def _returns_figure(runs: list[Run], *, by: str, window: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=RETURN_FIGSIZE, dpi=DPI, layout="constrained")
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        x = {
            "frame": run.frames,
            "hour": run.time / 3600.0,
            "episode": np.arange(1, len(run.returns) + 1),
        }[by]
        ax.plot(x, run.returns, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, smooth(run.returns, window), color=color, linewidth=2.0, label=run.label)
    if by == "frame":
        ax.set_xlabel("environment frames (all bundles)")
        ax.xaxis.set_major_formatter(FuncFormatter(_format_count))
        title = "Episode return by frames"
    elif by == "hour":
        ax.set_xlabel("hours of training (pauses between sittings left out)")
        title = "Episode return by wall-clock hours"
    else:
        ax.set_xlabel("episode (all bundles, in order of wall time)")
        title = "Episode return by episode"
    ax.set_ylabel("return (unclipped, whole game)")
    ax.set_title(f"{title}: faint = each episode, bold = mean of the last {window}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="run", loc="best")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _learner_figure(runs: list[Run], *, window: int, path: Path) -> Path:
    fig, axes = plt.subplots(
        1, len(LEARNER_KEYS), figsize=WIDE_PANEL_FIGSIZE, dpi=DPI, layout="constrained"
    )
    styles = ("-", "--", ":", "-.")
    drawn: set[str] = set()
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        for index, (bundle, records) in enumerate(sorted(run.learner.items())):
            if not len(records["time"]):
                continue
            name = run.label if len(run.learner) == 1 else f"{run.label} bundle {bundle}"
            for ax, (key, _) in zip(axes, LEARNER_KEYS, strict=True):
                logged = np.ones(len(records[key]), bool)
                if key in OPTIONAL_LEARNER_KEYS:  # nan where an older run did not log it
                    logged = ~np.isnan(records[key])
                    if not logged.any():
                        continue
                drawn.add(key)
                ax.plot(
                    records["total_frames"][logged],
                    smooth(records[key][logged], window),
                    color=color,
                    linestyle=styles[index % len(styles)],
                    linewidth=1.5,
                    label=name,
                )
    for ax, (key, title) in zip(axes, LEARNER_KEYS, strict=True):
        if "loss" in drawn and key not in drawn:  # runs logged before this metric existed
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("environment frames (all bundles)")
        ax.set_ylabel(title)
        ax.xaxis.set_major_formatter(FuncFormatter(_format_count))
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"Learner statistics (mean of the last {window} logged windows)")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bucket_low(label: str) -> float:
    match = re.match(r"\d+", str(label))
    return float(match.group()) if match else math.inf


def _grouped_bars(ax, categories: list[str], series: list[tuple[str, list[float], object]]):
    """Bars of several runs side by side for each category."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for index, (label, values, color) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values, width=width, color=color, label=label)
    ax.set_xticks(x, categories)


def _label_bars(ax) -> None:
    """Each bar's value above it, "n/a" for a value that is not known (NaN, no bar)."""
    for container in ax.containers:
        labels = ["" if math.isnan(v) else f"{v:.0f}" for v in container.datavalues]
        ax.bar_label(container, labels=labels, fontsize="small")
        for bar, value in zip(container, container.datavalues, strict=True):
            if math.isnan(value):  # no bar to label: say so at its foot
                x = bar.get_x() + bar.get_width() / 2
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize="small")


class ShardRate(NamedTuple):
    """One server shard's update rates, from its own statistics in ps.json's `shards` list."""

    shard: int
    whole_run: float  # its updates_per_second_run: version / running time (NaN: unknown)
    last_window: float  # its updates_per_second: the rate over its last stats window
    num_params: int  # the parameters the shard holds (0 when not given)


def _finite(value: object) -> float:
    """A number from JSON as a float; 0 for anything else (missing, text, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def run_rate(stats: dict, key: str = "updates_per_second_run") -> float:
    """A ps.json's whole-run update rate: its updates over the run's running time, every
    sitting summed (`updates_per_second_run`); NaN when the file does not know it (written
    before running time was kept: its uptime is the last sitting's alone, and dividing all
    the run's updates by it overstated the rate many times over). Another `key` reads
    another rate the same way."""
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return math.nan
    return float(value)


def shard_rates(stats: dict | None) -> list[ShardRate]:
    """Each shard's update rates from a ps.json of a server split in shards (its `shards`
    list), in shard order; empty for an unsharded server's ps.json (no such list). A shard is
    numbered by its `server_shard` (its place in the list when that is missing)."""
    shards = (stats or {}).get("shards")
    if not isinstance(shards, list):
        return []
    rates = []
    for place, shard in enumerate(shards):
        if not isinstance(shard, dict):
            continue
        number = shard.get("server_shard")
        rates.append(
            ShardRate(
                shard=number if isinstance(number, int) and not isinstance(number, bool) else place,
                whole_run=run_rate(shard),
                last_window=_finite(shard.get("updates_per_second")),
                num_params=int(_finite(shard.get("num_params"))),
            )
        )
    return sorted(rates, key=lambda rate: rate.shard)


def _shard_panel(ax, served: list[tuple[Run, object]]) -> None:
    """Updates per second of every shard: whole run (solid) and last window (faint) per run."""
    per_run = [(run, color, {r.shard: r for r in shard_rates(run.server)}) for run, color in served]
    shards = sorted({shard for _, _, rates in per_run for shard in rates})
    params = {shard: rates[shard].num_params for _, _, rates in per_run for shard in rates}
    series = []
    for run, color, rates in per_run:
        if not rates:
            continue
        whole = [rates[s].whole_run if s in rates else 0.0 for s in shards]
        last = [rates[s].last_window if s in rates else 0.0 for s in shards]
        series.append((f"{run.label} whole run", whole, color))
        series.append((f"{run.label} last window", last, (*to_rgb(color), 0.45)))
    labels = [
        f"shard {s}\n({_format_count(params[s])} params)" if params.get(s) else f"shard {s}"
        for s in shards
    ]
    _grouped_bars(ax, labels, series)
    _label_bars(ax)
    ax.set_ylabel("shard updates per second")
    ax.set_title("Updates per second by shard")
    ax.margins(y=0.25)  # room above the bars for the legend
    ax.legend(loc="upper right", fontsize="small")


def _server_figure(runs: list[Run], *, path: Path) -> Path:
    served = [
        (run, color)
        for run, color in zip(runs, _colors(len(runs)), strict=True)
        if run.server is not None
    ]
    sharded = any(shard_rates(run.server) for run, _ in served)
    fig, axes = plt.subplots(
        1,
        4 if sharded else 3,
        figsize=SHARDED_PANEL_FIGSIZE if sharded else PANEL_FIGSIZE,
        dpi=DPI,
        layout="constrained",
    )

    rate_ax, stale_ax, worker_ax = axes[:3]
    rates = []
    for run, color in served:
        stats = run.server
        sitting = run_rate(stats, "updates_per_second_sitting")
        last = _finite(stats.get("updates_per_second"))
        rates.append((run.label, [run_rate(stats), sitting, last], color))
    _grouped_bars(
        rate_ax, ["whole run\n(/ running time)", "this sitting\n(/ its uptime)", "last window"],
        rates,
    )  # fmt: skip
    _label_bars(rate_ax)
    rate_ax.set_ylabel("server updates per second")
    rate_ax.set_title("Parameter-server update rate")
    rate_ax.legend(loc="best", fontsize="small")

    buckets = sorted(
        {str(b) for run, _ in served for b in (run.server.get("staleness_histogram") or {})},
        key=_bucket_low,
    )
    shares = []
    for run, color in served:
        histogram = run.server.get("staleness_histogram") or {}
        total = sum(float(v) for v in histogram.values()) or 1.0
        shares.append(
            (run.label, [100.0 * float(histogram.get(b, 0)) / total for b in buckets], color)
        )
    _grouped_bars(stale_ax, buckets, shares)
    stale_ax.set_xlabel("staleness (server versions behind when the gradient arrived)")
    stale_ax.set_ylabel("% of accepted gradients")
    stale_ax.set_title("Staleness of accepted gradients")

    workers = sorted(
        {str(w) for run, _ in served for w in (run.server.get("workers") or {})},
        key=_bucket_low,
    )
    accepted = []
    for run, color in served:
        counts = run.server.get("workers") or {}
        rejected = sum(int(v) for v in (run.server.get("rejections") or {}).values())
        accepted.append(
            (
                f"{run.label} ({rejected} rejected)",
                [float((counts.get(w) or {}).get("accepted", 0)) for w in workers],
                color,
            )
        )
    _grouped_bars(worker_ax, [f"bundle {int(w) + 1}" for w in workers], accepted)
    worker_ax.set_ylabel("accepted gradient pushes")
    worker_ax.set_title("Pushes accepted per bundle")
    worker_ax.yaxis.set_major_formatter(FuncFormatter(_format_count))
    worker_ax.legend(loc="lower right", fontsize="small")
    if sharded:
        _shard_panel(axes[3], served)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Parameter server (ps.json at the end of the run)")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def make_plots(run_dirs: list[Path | str], out_dir: Path | str, *, window: int = 20) -> list[Path]:
    """Write the figures of the runs (overlaid) into out_dir; returns the files written.

    Always: returns by episode, by frame and by hour. With learner.jsonl: learner statistics. With
    ps.json in any run: the server's update rate, staleness histogram and pushes per bundle
    (of a sharded server: the whole server's, as combined in ps.json), and, when any run's
    server was split in shards (a `shards` list in ps.json), a 4th panel with each shard's
    updates per second, over the whole run and over its last stats window (`shard_rates`);
    the figure is then SHARDED_PANEL_FIGSIZE wide instead of PANEL_FIGSIZE.
    """
    if window < 1:
        raise PlotError(f"--smooth must be >= 1, got {window}")
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise PlotError("no run directory given")
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _returns_figure(runs, by="episode", window=window, path=out_dir / RETURNS_BY_EPISODE),
        _returns_figure(runs, by="frame", window=window, path=out_dir / RETURNS_BY_FRAME),
        _returns_figure(runs, by="hour", window=window, path=out_dir / RETURNS_BY_HOUR),
    ]
    if any(len(r["time"]) for run in runs for r in run.learner.values()):
        learner_window = max(1, window // 4)
        written.append(_learner_figure(runs, window=learner_window, path=out_dir / LEARNER))
    if any(run.server is not None for run in runs):
        written.append(_server_figure(runs, path=out_dir / SERVER))
    return written
