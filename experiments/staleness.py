"""What asynchrony costs on CartPole, and whether DC-ASGD buys it back (issue 22, item 2).

Runs `experiments/cartpole.py` (its defaults, one run at a time) in six set-ups, each on the
same evaluation seeds: one process; synchronous data parallelism with 2 processes; a
parameter server with 2 and with 6 bundles; and a server with 6 bundles plus DC-ASGD, in
its constant and its adaptive form, each with a lambda tuned on other seeds. For every run
it measures the frames and the seconds until the mean return of 20 consecutive episodes
(all bundles, in order of wall time) first reaches 195, and the staleness histogram the
server recorded (RUN_DIR/ps.json). A run is stopped the moment it is solved (SIGTERM: it
saves and exits) or ends on its frame budget.

    python experiments/staleness.py --out /work/runs/staleness   # the whole study
    python experiments/staleness.py --configs single async2 --seeds 0 --budget 20000
    python experiments/staleness.py --out /work/runs/staleness --report-only

Every finished run is appended to OUT/results.jsonl, and a rerun skips the runs found there,
so the study can be cut off (Ctrl-C, a reboot) and started again with the same command; a
run that was cut off is started over from nothing, since its seconds would otherwise count
a pause. After the runs (or alone, with --report-only) it writes DOCS/README.md (method,
table, histograms), results.json, results.csv and two figures from every result found.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from gorila_jax.core import cli

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ROOT / "experiments" / "cartpole.py"
TARGET = 195.0
"""Mean return that counts as solved (gymnasium's CartPole-v0 threshold, as the tests use)."""
WINDOW = 20
"""Consecutive episodes (all bundles, in order of wall time) averaged against TARGET."""
POLL_SECONDS = 0.5
"""How often a running run's episodes are read to see whether it is solved."""
STOP_GRACE_SECONDS = 120.0
"""How long a run told to stop (SIGTERM) may take to save and exit before it is killed."""
CONSTANT_GRID = (0.04, 1.0, 25.0, 625.0)
"""Lambdas tried for DC-ASGD's constant form: the paper's 0.04, then steps of 25x. Before
Adam, the term lambda * g * g * (w - w_stale) is of the order lambda * |g| * lr * staleness
relative to g, which is far below 1% at 0.04 here; 625 makes it comparable to g."""
ADAPTIVE_GRID = (2.0, 8.0, 32.0, 128.0)
"""Lambdas tried for DC-ASGD's adaptive form (the paper's 2.0, then steps of 4x): its term is
of the order lambda * lr * staleness relative to g."""
GRIDS = {"constant": CONSTANT_GRID, "adaptive": ADAPTIVE_GRID}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One configuration of the study: a name, what it is, and cartpole.py's flags for it."""

    name: str
    label: str
    flags: tuple[str, ...]
    dc_asgd: str = "off"  # "constant" / "adaptive": its lambda is tuned, then passed
    server: bool = True  # False: no parameter server, so no staleness at all

    def is_tuned(self) -> bool:
        """Whether a lambda must be chosen (on the tuning seeds) before its runs."""
        return self.dc_asgd != "off"


SETUPS = (
    Setup("single", "single process", ("--single-process",), server=False),
    Setup("sync2", "sync, 2 processes", ("--mode", "sync", "--workers", "2"), server=False),
    Setup("async2", "async, 2 bundles", ("--workers", "2")),
    Setup("async6", "async, 6 bundles", ("--workers", "6")),
    Setup(
        "async6-dc-constant",
        "async, 6 bundles, DC-ASGD constant",
        ("--workers", "6", "--dc-asgd", "constant"),
        dc_asgd="constant",
    ),
    Setup(
        "async6-dc-adaptive",
        "async, 6 bundles, DC-ASGD adaptive",
        ("--workers", "6", "--dc-asgd", "adaptive"),
        dc_asgd="adaptive",
    ),
)
SETUP_NAMES = tuple(setup.name for setup in SETUPS)
BY_NAME = {setup.name: setup for setup in SETUPS}


@dataclasses.dataclass(frozen=True)
class StudyArgs:
    """CartPole staleness study: single process, sync, async with 2 and 6 bundles, DC-ASGD."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Evaluation seeds: every configuration is run once on each."""
    configs: tuple[str, ...] = SETUP_NAMES
    """Configurations to run (any of single, sync2, async2, async6, async6-dc-constant,
    async6-dc-adaptive); the report covers every configuration with results."""
    budget: int = 100_000
    """Frame budget of each run (--total-frames: frames of the whole run, all bundles); a
    run that has not solved by then counts as not solved."""
    tune_seeds: tuple[int, ...] = (100, 101, 102)
    """Seeds on which the DC-ASGD lambdas are chosen; must share none with --seeds."""
    out: Path = Path("runs/staleness")
    """Directory for the run directories, their logs and results.jsonl (the study's memory:
    runs found there are not run again)."""
    docs: Path = ROOT / "docs" / "staleness"
    """Where README.md, results.json, results.csv and the figures are written."""
    run_timeout: float = 1800.0
    """Seconds after which a run that neither solved nor ended is stopped (counted as not
    solved, its status "timeout")."""
    report_only: bool = False
    """Run nothing: write the report from OUT/results.jsonl as it is."""


def check_args(args: StudyArgs) -> None:
    """Refuse a study that cannot run as asked, before anything runs (one-line error)."""
    unknown = [name for name in args.configs if name not in BY_NAME]
    if unknown:
        raise cli.CommandLineError(
            f"--configs: unknown configuration {unknown[0]!r}; one of {', '.join(SETUP_NAMES)}"
        )
    if not args.configs:
        raise cli.CommandLineError("--configs: give at least one configuration")
    for flag, seeds in (("--seeds", args.seeds), ("--tune-seeds", args.tune_seeds)):
        if not seeds:
            raise cli.CommandLineError(f"{flag}: give at least one seed")
        if any(seed < 0 for seed in seeds):
            raise cli.CommandLineError(f"{flag}: seeds must be >= 0, got {list(seeds)}")
        if len(set(seeds)) != len(seeds):
            raise cli.CommandLineError(f"{flag}: a seed is given twice: {list(seeds)}")
    shared = sorted(set(args.seeds) & set(args.tune_seeds))
    if shared:
        raise cli.CommandLineError(
            f"--tune-seeds must share no seed with --seeds (lambda is chosen on other seeds), "
            f"both have {shared}"
        )
    if args.budget <= 0:
        raise cli.CommandLineError(
            f"--budget must be a positive number of frames, got {args.budget}"
        )
    if not args.run_timeout > 0:
        raise cli.CommandLineError(f"--run-timeout must be > 0, got {args.run_timeout}")


# ---- reading a run ---------------------------------------------------------------------------


class Row(NamedTuple):
    """One finished episode of an episodes.csv: when (seconds since its bundle's logger
    started), the frames its bundle (or the single process) had collected, which bundle, and
    its return."""

    time: float
    frames: int
    bundle: int
    ret: float


class Solved(NamedTuple):
    """Where a run first reached the target."""

    frames: int  # frames of the whole run: each bundle's latest logged frames, summed
    seconds: float  # the solving episode's time on its bundle's clock
    episode: int  # how many episodes (all bundles) had finished, the solving one included
    mean: float  # the mean return of the window that reached the target


def parse_rows(text: str) -> list[Row]:
    """The complete episode lines of an episodes.csv's text (header: time, frames, bundle,
    env, return, length). The last line is left out unless it ends in a newline (a writer
    may be halfway through it); lines that do not parse are skipped."""
    rows = []
    for line in text.split("\n")[1:-1]:
        fields = line.split(",")
        if len(fields) != 6:
            continue
        try:
            row = Row(float(fields[0]), int(fields[1]), int(fields[2]), float(fields[4]))
        except ValueError:
            continue
        if math.isfinite(row.time) and math.isfinite(row.ret):
            rows.append(row)
    return rows


def episode_files(run_dir: Path) -> list[Path]:
    """A run's episodes.csv files: one per bundle (distributed, sync) or one at the top."""
    bundles = sorted(run_dir.glob("bundle*/episodes.csv"))
    return bundles or [run_dir / "episodes.csv"]


def read_rows(run_dir: Path) -> list[Row]:
    """Every finished episode the run has logged so far, all bundles."""
    rows = []
    for path in episode_files(run_dir):
        try:
            rows.extend(parse_rows(path.read_text()))
        except (OSError, UnicodeDecodeError):
            continue
    return rows


def solve_point(
    rows: Iterable[Row], *, target: float = TARGET, window: int = WINDOW
) -> Solved | None:
    """The first moment the mean return of `window` consecutive episodes, all bundles merged
    in order of wall time, reached `target`; None if it never has.

    Its frames are those of the whole run then: for each bundle, the frames of its latest
    episode logged at or before that moment, summed (the frames a bundle played after its
    last finished episode are not counted, for every configuration alike). Episodes that
    end at the same time are ordered by bundle, then frames, so the answer does not depend
    on the order of the files."""
    ordered = sorted(rows, key=lambda row: (row.time, row.bundle, row.frames))
    for end in range(window, len(ordered) + 1):
        mean = math.fsum(row.ret for row in ordered[end - window : end]) / window
        if mean >= target:
            when = ordered[end - 1].time
            latest: dict[int, int] = {}
            for row in ordered[:end]:
                if row.time <= when:
                    latest[row.bundle] = max(latest.get(row.bundle, 0), row.frames)
            return Solved(sum(latest.values()), when, end, mean)
    return None


def run_frames(rows: Iterable[Row]) -> int:
    """The frames of the whole run by its last logged episodes (each bundle's latest, summed)."""
    latest: dict[int, int] = {}
    for row in rows:
        latest[row.bundle] = max(latest.get(row.bundle, 0), row.frames)
    return sum(latest.values())


def best_mean(rows: Iterable[Row], *, window: int = WINDOW) -> float | None:
    """The best mean return of `window` consecutive episodes (merged as in solve_point)."""
    ordered = sorted(rows, key=lambda row: (row.time, row.bundle, row.frames))
    means = [
        math.fsum(row.ret for row in ordered[end - window : end]) / window
        for end in range(window, len(ordered) + 1)
    ]
    return max(means) if means else None


# ---- staleness histograms ----------------------------------------------------------------------


def bin_low(label: str) -> int:
    """The smallest staleness of a histogram bin ("0", "1", "2-3", ..., "256+")."""
    digits = ""
    for char in str(label):
        if not char.isdigit():
            break
        digits += char
    if not digits:
        raise ValueError(f"not a staleness bin: {label!r}")
    return int(digits)


def merge_histograms(histograms: Iterable[dict | None]) -> dict[str, int]:
    """Staleness histograms (ps.json's `staleness_histogram`, bin label -> pushes) summed bin by
    bin, in order of staleness. Missing histograms (None) and counts that are not
    non-negative integers are left out."""
    total: dict[str, int] = {}
    for histogram in histograms:
        for label, count in (histogram or {}).items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                continue
            total[str(label)] = total.get(str(label), 0) + count
    return dict(sorted(total.items(), key=lambda item: bin_low(item[0])))


def histogram_median(histogram: dict[str, int]) -> str | None:
    """The bin that holds the median push (the lower median: the ceil(n / 2)-th in order of
    staleness, n pushes in all); None for an empty histogram."""
    merged = merge_histograms([histogram])
    count = sum(merged.values())
    if count == 0:
        return None
    rank = (count + 1) // 2
    seen = 0
    for label, pushes in merged.items():
        seen += pushes
        if seen >= rank:
            return label
    raise AssertionError("unreachable: the counts sum to at least rank")


# ---- medians, spreads and the choice of lambda -------------------------------------------------


class Spread(NamedTuple):
    """Median, smallest and largest of some runs' values (math.inf: a run that did not
    solve, which ranks above every run that did)."""

    median: float
    low: float
    high: float
    count: int


def spread(values: Sequence[float]) -> Spread | None:
    """The median (of an even count, the mean of the middle two), min and max; None when empty."""
    if not values:
        return None
    return Spread(
        float(statistics.median(values)), float(min(values)), float(max(values)), len(values)
    )


def frames_or_inf(record: dict) -> float:
    """A run's frames to the target, math.inf if it did not reach it."""
    frames = record.get("frames_to_solve")
    return math.inf if frames is None else float(frames)


def seconds_or_inf(record: dict, key: str = "seconds_to_solve") -> float:
    """A run's seconds to the target, math.inf if it did not reach it: from its launch
    (`seconds_to_solve`) or on the clock of the bundle that logged the solving episode,
    which starts when it begins to act (`run_seconds_to_solve`)."""
    seconds = record.get(key)
    return math.inf if seconds is None else float(seconds)


def stale_rejections(records: Iterable[dict]) -> int:
    """Pushes the server refused as older than --max-staleness, summed over runs (they are
    not in the histogram, which counts accepted pushes)."""
    total = 0
    for record in records:
        count = (record.get("rejections") or {}).get("stale", 0)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            total += count
    return total


class LambdaScore(NamedTuple):
    """How one lambda did on the tuning seeds."""

    dc_lambda: float
    solved: int
    runs: int
    median_frames: float  # math.inf when half or more of its runs did not solve


def select_lambda(
    records: Iterable[dict], grid: Sequence[float]
) -> tuple[float | None, list[LambdaScore]]:
    """Choose a DC-ASGD lambda from tuning runs (records of one form, `dc_lambda` set): the
    grid value with the lowest median frames to the target over its runs, a run that did
    not solve counting as infinitely many; ties go to the one that solved more runs, then to
    the smaller lambda (the weaker change to plain ASGD). Lambdas with no runs are left
    out; None when there are no runs at all."""
    scores = []
    records = list(records)
    for dc_lambda in grid:
        runs = [r for r in records if r.get("dc_lambda") == dc_lambda]
        if not runs:
            continue
        frames = [frames_or_inf(r) for r in runs]
        solved = sum(math.isfinite(f) for f in frames)
        scores.append(LambdaScore(dc_lambda, solved, len(runs), float(statistics.median(frames))))
    if not scores:
        return None, []
    best = min(scores, key=lambda s: (s.median_frames, -s.solved, s.dc_lambda))
    return best.dc_lambda, scores


# ---- results file ------------------------------------------------------------------------------


def run_key(setup: str, phase: str, seed: int, dc_lambda: float | None, budget: int) -> str:
    """The name of one run: its results line, run directory and log file."""
    name = f"{setup}-{phase}-seed{seed}-budget{budget}"
    return name if dc_lambda is None else f"{name}-lambda{dc_lambda:g}"


def record_key(record: dict) -> str:
    """run_key of a results record."""
    return run_key(
        record["config"], record["phase"], record["seed"], record.get("dc_lambda"), record["budget"]
    )


def read_results(path: Path) -> list[dict]:
    """The records of results.jsonl (one JSON object a line); a line that does not parse (a
    write cut off) is skipped, and of two records of the same run the later one wins."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    found: dict[str, dict] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            found[record_key(record)] = record
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return list(found.values())


def append_result(path: Path, record: dict) -> None:
    """Add one finished run to results.jsonl, synced, so a cut-off study keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---- running ---------------------------------------------------------------------------------


class RunFailed(RuntimeError):
    """A run that ended with an error before it solved or spent its budget; one line."""


RESOLVED_FIELDS = ("seed", "total_frames", "single_process", "mode", "workers", "dc_asgd",
                   "dc_asgd_lambda")  # fmt: skip
"""Settings of RUN_DIR/config.yaml kept with each result (what the run really trained with)."""


def resolved_settings(run_dir: Path) -> dict:
    """RESOLVED_FIELDS of the run's resolved config (RUN_DIR/config.yaml); {} if unreadable."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {name: config.get(name) for name in RESOLVED_FIELDS} if isinstance(config, dict) else {}


def settings_mismatch(
    settings: dict, setup: Setup, seed: int, dc_lambda: float | None, budget: int
) -> str | None:
    """What the resolved config says differently from what the study asked for (seed,
    budget, DC-ASGD form and lambda), or None when it agrees."""
    wanted = {"seed": seed, "total_frames": budget, "dc_asgd": setup.dc_asgd}
    if dc_lambda is not None:
        wanted["dc_asgd_lambda"] = dc_lambda
    for name, value in wanted.items():
        if settings.get(name) != value:
            return f"config.yaml has {name} {settings.get(name)!r}, the study asked for {value!r}"
    return None


def server_stats(run_dir: Path) -> dict | None:
    """The server's figures of a distributed run (ps.json; of a sharded one, combined)."""
    from gorila_jax.server.server_stats import read_run_stats

    return read_run_stats(run_dir)


def stop(process: subprocess.Popen) -> int:
    """Stop a run as a user would (SIGTERM: it saves and exits), killing it if it has not
    exited within STOP_GRACE_SECONDS; its exit status (at once if it had already ended)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def run_one(setup: Setup, phase: str, seed: int, dc_lambda: float | None, args: StudyArgs) -> dict:
    """Run cartpole.py in one configuration from nothing until it solves (then SIGTERM: it
    saves and exits), ends on its budget, or runs past --run-timeout; its results record.
    Raises RunFailed when it ended with an error without solving."""
    name = run_key(setup.name, phase, seed, dc_lambda, args.budget)
    out = args.out.resolve()  # the run starts in ROOT: a relative --out must mean the same
    run_dir = out / "runs" / name
    log_path = out / "logs" / f"{name}.log"
    if run_dir.exists():  # cut off before: a fresh start, so its seconds count no pause
        shutil.rmtree(run_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(CARTPOLE), *setup.flags,
        "--seed", str(seed), "--total-frames", str(args.budget), "--run-dir", str(run_dir),
        "--no-checkpoint-replay",
    ]  # fmt: skip
    if dc_lambda is not None:
        command += ["--dc-asgd-lambda", repr(dc_lambda)]
    started = time.monotonic()
    solved: Solved | None = None
    solved_after: float | None = None
    stopped = "budget"
    with log_path.open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                solved = solve_point(read_rows(run_dir))
                if solved is not None:
                    solved_after = time.monotonic() - started
                    stopped = "solved"
                    break
                if time.monotonic() - started > args.run_timeout:
                    stopped = "timeout"
                    break
                time.sleep(POLL_SECONDS)
        finally:  # solved, timed out, or the study itself interrupted: the run saves and exits
            code = stop(process)
    wall = time.monotonic() - started
    rows = read_rows(run_dir)
    if solved is None:  # it may have solved in the episodes it wrote just before it ended
        solved = solve_point(rows)
        if solved is not None:
            solved_after, stopped = wall, "solved"
    if solved is None and stopped == "budget" and code != 0:
        raise RunFailed(f"{name} exited with status {code} before solving; see {log_path}")
    settings = resolved_settings(run_dir)
    mismatch = settings_mismatch(settings, setup, seed, dc_lambda, args.budget)
    if mismatch is not None:
        raise RunFailed(f"{name}: {mismatch}; see {log_path}")
    stats = server_stats(run_dir) if setup.server else None
    return {
        "config": setup.name,
        "phase": phase,
        "seed": seed,
        "dc_lambda": dc_lambda,
        "budget": args.budget,
        "stopped": stopped,
        "solved": solved is not None,
        "frames_to_solve": None if solved is None else solved.frames,
        "seconds_to_solve": None if solved_after is None else round(solved_after, 2),
        "run_seconds_to_solve": None if solved is None else solved.seconds,
        "episodes_to_solve": None if solved is None else solved.episode,
        "best_mean_return": best_mean(rows),
        "final_frames": run_frames(rows),
        "episodes": len(rows),
        "wall_seconds": round(wall, 2),
        "exit_code": code,
        "staleness_histogram": merge_histograms([(stats or {}).get("staleness_histogram")]),
        "server_updates": (stats or {}).get("updates"),
        "rejections": (stats or {}).get("rejections"),
        "run_dir": str(run_dir),
        "settings": settings,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def describe(record: dict) -> str:
    """One line about a finished run for the study's output."""
    what = f"{record['config']} seed {record['seed']}"
    if record.get("dc_lambda") is not None:
        what += f" lambda {record['dc_lambda']:g}"
    if record["phase"] == "tune":
        what += " (tuning)"
    if record["solved"]:
        result = (
            f"solved at {record['frames_to_solve']:,} frames, {record['seconds_to_solve']:.0f} s"
        )
    else:
        best = record.get("best_mean_return")
        best_text = "no window of 20 episodes" if best is None else f"best mean {best:.1f}"
        result = f"not solved ({record['stopped']}, {record['final_frames']:,} frames, {best_text})"
    median = histogram_median(record.get("staleness_histogram") or {})
    if median is not None:
        result += f", median staleness {median}"
    return f"{what}: {result} [{record['wall_seconds']:.0f} s wall]"


class Plan(NamedTuple):
    """One run the study wants."""

    setup: Setup
    phase: str  # "eval" (an evaluation seed) or "tune" (a lambda on a tuning seed)
    seed: int
    dc_lambda: float | None

    def key(self, budget: int) -> str:
        """Its run_key at this budget."""
        return run_key(self.setup.name, self.phase, self.seed, self.dc_lambda, budget)


def plain_plans(args: StudyArgs) -> list[Plan]:
    """The evaluation runs of the configurations without a lambda to tune, seed by seed (so
    a study cut off early has every configuration on its first seeds)."""
    setups = [BY_NAME[name] for name in args.configs if not BY_NAME[name].is_tuned()]
    return [Plan(setup, "eval", seed, None) for seed in args.seeds for setup in setups]


def tuning_plans(args: StudyArgs) -> list[Plan]:
    """The tuning runs: every grid lambda of every requested DC-ASGD form on every tuning seed."""
    setups = [BY_NAME[name] for name in args.configs if BY_NAME[name].is_tuned()]
    return [
        Plan(setup, "tune", seed, dc_lambda)
        for setup in setups
        for seed in args.tune_seeds
        for dc_lambda in GRIDS[setup.dc_asgd]
    ]


def chosen_lambdas(records: list[dict], args: StudyArgs) -> dict[str, float | None]:
    """Per DC-ASGD configuration, the lambda chosen by its tuning runs (this budget, these
    tuning seeds); None where it has none."""
    chosen = {}
    for setup in SETUPS:
        if setup.is_tuned():
            tuning = [
                r for r in records
                if r["config"] == setup.name and r["phase"] == "tune"
                and r["budget"] == args.budget and r["seed"] in args.tune_seeds
            ]  # fmt: skip
            chosen[setup.name] = select_lambda(tuning, GRIDS[setup.dc_asgd])[0]
    return chosen


def tuned_plans(args: StudyArgs, chosen: dict[str, float | None]) -> list[Plan]:
    """The evaluation runs of the DC-ASGD configurations, at the lambda their tuning chose."""
    setups = [BY_NAME[name] for name in args.configs if BY_NAME[name].is_tuned()]
    return [
        Plan(setup, "eval", seed, chosen[setup.name])
        for seed in args.seeds
        for setup in setups
        if chosen.get(setup.name) is not None
    ]


def run_plans(stage: str, plans: list[Plan], args: StudyArgs, results: Path, done: set[str]) -> int:
    """Run every plan not in `done`, one at a time, appending each to results; the count of
    runs that failed. `stage` names this part of the study in the progress lines."""
    todo = [plan for plan in plans if plan.key(args.budget) not in done]
    failed = 0
    for index, plan in enumerate(todo, start=1):
        print(f"[{stage} {index}/{len(todo)}] {plan.key(args.budget)} ...", flush=True)
        try:
            record = run_one(plan.setup, plan.phase, plan.seed, plan.dc_lambda, args)
        except RunFailed as error:
            print(f"  FAILED: {error}", flush=True)
            failed += 1
            continue
        append_result(results, record)
        done.add(record_key(record))
        print(f"  {describe(record)}", flush=True)
    return failed


# ---- the report --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    """One configuration's evaluation runs, summed up."""

    config: str
    label: str
    dc_lambda: float | None
    runs: list[dict]
    solved: int
    frames: Spread | None
    seconds: Spread | None  # from launch
    acting: Spread | None  # on the solving bundle's clock, from when it began to act
    histogram: dict[str, int]
    stale_rejections: int
    staleness: str | None  # the bin of the median push (None: no server, no staleness)


def summarize(
    setup: Setup, records: list[dict], args: StudyArgs, dc_lambda: float | None
) -> Summary:
    """The evaluation runs of `setup` on args.seeds at args.budget (at `dc_lambda` for a DC-ASGD
    configuration), in order of seed."""
    runs = sorted(
        (
            r for r in records
            if r["config"] == setup.name and r["phase"] == "eval" and r["seed"] in args.seeds
            and r["budget"] == args.budget and r.get("dc_lambda") == dc_lambda
        ),
        key=lambda r: r["seed"],
    )  # fmt: skip
    histogram = merge_histograms(r.get("staleness_histogram") for r in runs)
    return Summary(
        config=setup.name,
        label=setup.label,
        dc_lambda=dc_lambda,
        runs=runs,
        solved=sum(bool(r["solved"]) for r in runs),
        frames=spread([frames_or_inf(r) for r in runs]),
        seconds=spread([seconds_or_inf(r) for r in runs]),
        acting=spread([seconds_or_inf(r, "run_seconds_to_solve") for r in runs]),
        histogram=histogram,
        stale_rejections=stale_rejections(runs),
        staleness=histogram_median(histogram) if setup.server else None,
    )


def paired_wins(first: list[dict], second: list[dict]) -> tuple[int, int, int]:
    """On the seeds both have, how often `first` reached the target in fewer frames than
    `second`, in more, and as many (two runs that did not solve are a tie)."""
    theirs = {r["seed"]: frames_or_inf(r) for r in second}
    wins = losses = ties = 0
    for record in first:
        if record["seed"] not in theirs:
            continue
        mine, other = frames_or_inf(record), theirs[record["seed"]]
        if mine < other:
            wins += 1
        elif mine > other:
            losses += 1
        else:
            ties += 1
    return wins, losses, ties


def format_count(value: float, budget: int) -> str:
    """Frames as 12,345, or "> budget" for a run (or median) that did not solve."""
    return f"> {budget:,}" if math.isinf(value) else f"{value:,.0f}"


def format_seconds(value: float) -> str:
    """Seconds as 63, or "not solved"."""
    return "not solved" if math.isinf(value) else f"{value:,.0f}"


def format_spread(value: Spread | None, fmt) -> str:
    """'median [min–max]' of a Spread; '–' when there are no runs."""
    if value is None:
        return "–"
    if math.isinf(value.low):  # none solved: nothing to spread
        return fmt(value.low)
    return f"{fmt(value.median)} [{fmt(value.low)}–{fmt(value.high)}]"


def histogram_text(histogram: dict[str, int]) -> str:
    """A histogram as 'bin: count (share)', bins in order of staleness."""
    total = sum(histogram.values())
    if not total:
        return "–"
    return ", ".join(
        f"{label}: {count:,} ({100 * count / total:.0f}%)" for label, count in histogram.items()
    )


def reading(summaries: dict[str, Summary], budget: int) -> list[str]:
    """Sentences that state what the table shows, computed from it (the same rules whatever
    the outcome): each configuration's median frames against one process's, and DC-ASGD
    against plain async with 6 bundles on the same seeds."""
    lines = []
    base = summaries.get("single")
    for name, summary in summaries.items():
        if not summary.runs or summary.frames is None:
            continue
        text = f"{summary.label}: {summary.solved}/{len(summary.runs)} runs solved"
        text += f" within {budget:,} frames"
        if summary.staleness is not None:
            text += f", the median push {summary.staleness} versions stale"
        if name != "single" and base is not None and base.frames is not None:
            mine, theirs = summary.frames.median, base.frames.median
            if math.isfinite(mine) and math.isfinite(theirs):
                text += f"; median frames to {TARGET:g} {mine / theirs:.2f}x one process's"
        lines.append(text + ".")
    plain = summaries.get("async6")
    for name in ("async6-dc-constant", "async6-dc-adaptive"):
        summary = summaries.get(name)
        if summary is None or not summary.runs or plain is None or not plain.runs:
            continue
        wins, losses, ties = paired_wins(summary.runs, plain.runs)
        lines.append(
            f"{summary.label} (lambda {summary.dc_lambda:g}) against plain async with 6 bundles, "
            f"seed by seed: fewer frames to {TARGET:g} on {wins}, more on {losses}, as many on "
            f"{ties} (both unsolved counts as as many)."
        )
    return lines


def write_plots(summaries: list[Summary], budget: int, docs: Path) -> list[Path]:
    """frames_to_solve.png (each run's frames and seconds to the target per configuration,
    the median as a bar) and staleness.png (each server configuration's share of accepted
    pushes per staleness bin, its runs summed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summaries if s.runs]
    paths: list[Path] = []
    if not shown:
        return paths
    figure, axes = plt.subplots(1, 2, figsize=(13.0, 4.8))
    for ax, key, what in (
        (axes[0], "frames", "frames"),
        (axes[1], "seconds", "seconds from launch"),
    ):
        for index, summary in enumerate(shown):
            count = len(summary.runs)
            for position, record in enumerate(summary.runs):
                x = index + (position - (count - 1) / 2) * 0.08
                if record["solved"]:
                    value = (
                        record["frames_to_solve"] if key == "frames" else record["seconds_to_solve"]
                    )
                    ax.plot(x, value, "o", color="C0")
                else:
                    value = budget if key == "frames" else record["wall_seconds"]
                    ax.plot(x, value, "x", color="C3", markersize=8)
            median = getattr(summary, key)
            if median is not None and math.isfinite(median.median):
                ax.hlines(median.median, index - 0.3, index + 0.3, color="black")
        ax.set_xticks(range(len(shown)), [s.config for s in shown], rotation=20, ha="right")
        ax.set_ylabel(f"{what} to a mean return of {TARGET:g}")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"frames (x: not solved, drawn at the budget, {budget:,})")
    axes[1].set_title("seconds (x: not solved, drawn at the run's length)")
    figure.tight_layout()
    paths.append(docs / "frames_to_solve.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)

    served = [s for s in shown if s.histogram]
    if served:
        labels = list(merge_histograms(s.histogram for s in served))
        figure, ax = plt.subplots(figsize=(10.0, 4.8))
        width = 0.8 / len(served)
        for index, summary in enumerate(served):
            total = sum(summary.histogram.values())
            shares = [100 * summary.histogram.get(label, 0) / total for label in labels]
            offsets = [i + (index - (len(served) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(offsets, shares, width=width, label=f"{summary.config} ({total:,} pushes)")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("staleness (server versions between a gradient's params and its apply)")
        ax.set_ylabel("share of accepted pushes (%)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        paths.append(docs / "staleness.png")
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


CSV_FIELDS = (
    "config", "phase", "seed", "dc_lambda", "budget", "solved", "stopped", "frames_to_solve",
    "seconds_to_solve", "run_seconds_to_solve", "episodes_to_solve", "best_mean_return",
    "final_frames", "wall_seconds", "exit_code", "server_updates", "median_staleness",
    "staleness_histogram",
)  # fmt: skip


def csv_text(records: list[dict]) -> str:
    """One row per run (evaluation and tuning), the histogram as JSON in its column."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for record in records:
        row = dict(record)
        row["median_staleness"] = histogram_median(record.get("staleness_histogram") or {}) or ""
        row["staleness_histogram"] = json.dumps(record.get("staleness_histogram") or {})
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def settings_text() -> str:
    """The training settings every run shares (experiments/cartpole.py's defaults), in words."""
    from gorila_jax.core.config import cartpole_defaults

    c = cartpole_defaults()
    return (
        f"{c.env_id} with the defaults of `experiments/cartpole.py`: "
        f"{'Double DQN' if c.double_dqn else 'DQN'}, {c.n_step}-step returns, {c.optimizer} at "
        f"{c.learning_rate:g}, batch {c.batch_size}, {c.num_envs} environments per bundle, a "
        f"learner step every {c.train_every} agent steps after {c.learning_starts:,} frames per "
        f"bundle, epsilon {c.epsilon_start:g} to {c.epsilon_end:g} over the run's first "
        f"{c.epsilon_decay_frames:,} frames, target network every {c.target_period} updates, "
        f"bundles pull params every {c.sync_every} learner steps, the server refuses pushes "
        f"more than {c.max_staleness} versions stale"
    )


def changed_flags(args: StudyArgs) -> list[str]:
    """The flags of the study's command line that change what its report holds (seeds,
    tuning seeds, budget), where they differ from the defaults."""
    flags = []
    default = StudyArgs()
    for name in ("seeds", "tune_seeds", "budget"):
        value = getattr(args, name)
        if value != getattr(default, name):
            words = value if isinstance(value, tuple) else (value,)
            flags.append(f"--{name.replace('_', '-')} {' '.join(map(str, words))}")
    return flags


def readme_text(
    summaries: list[Summary],
    tuning: dict[str, list[LambdaScore]],
    chosen: dict[str, float | None],
    args: StudyArgs,
    figures: list[Path],
) -> str:
    """docs/staleness/README.md: the method, the table, the lambda choice, the histograms,
    every run, and the reading."""
    budget = args.budget
    seeds = ", ".join(map(str, args.seeds))
    tune_seeds = ", ".join(map(str, args.tune_seeds))
    command = " ".join(["python experiments/staleness.py", *changed_flags(args)])
    lines = [
        "# Staleness on CartPole: what asynchrony costs, and whether DC-ASGD buys it back",
        "",
        f"Produced by `{command}` (`--out DIR` for the run directories; a rerun skips the runs "
        "already in DIR/results.jsonl). Every number below comes from the runs in "
        "`results.json`; this file, `results.csv` and the figures are rewritten by each run "
        "of the study (`--report-only` rewrites them without running anything).",
        "",
        "## Method",
        "",
        f"- **Task and settings.** {settings_text()}, the same in every configuration: only "
        "the layout changes. Replay is not checkpointed (`--no-checkpoint-replay`): no run is "
        "resumed.",
        "- **Configurations.** `single`: one process (`--single-process`). `sync2`: 2 processes "
        "averaging their gradients every step (`--mode sync --workers 2`), no server. "
        "`async2`, `async6`: a parameter server and 2 or 6 bundles (`--workers 2|6`). "
        "`async6-dc-constant`, `async6-dc-adaptive`: `async6` with `--dc-asgd constant|adaptive "
        "--dc-asgd-lambda L`, L tuned as below. All processes of a run share this machine's "
        "2 cores (7 processes for 6 bundles), one run at a time. Per frame of the run, one "
        "process and the server take the same number of updates (a batch per 4 agent steps "
        "of a bundle); sync takes half as many, each on both processes' batches at once.",
        f"- **Solved.** The first moment the mean return of {WINDOW} consecutive finished "
        "episodes, all bundles merged in order of wall time, is at least "
        f"{TARGET:g}. **Frames to {TARGET:g}**: the frames of the whole run then (each "
        "bundle's frames at its latest episode logged by then, summed; frames are environment "
        "steps, all environments of all bundles). **Seconds from launch**: from the study "
        "starting the run (process start-up, rendezvous and compilation included) to it "
        f"seeing the solving episode (it reads the episode files every {POLL_SECONDS:g} s). "
        "**Seconds acting**: the solving episode's time in its episodes.csv, on the clock of "
        "the bundle (or process) that logged it, which starts when that bundle begins to act "
        "(start-up left out). A solved run is then "
        "stopped with SIGTERM; a run that is not solved ends on its budget of "
        f"{budget:,} frames and counts as not solved (`> {budget:,}`).",
        f"- **Seeds.** Evaluation seeds {seeds}: each configuration runs once on each "
        "(`--seed`; bundle i uses seed + i). Asynchronous runs are seeded but not "
        "reproducible: the order in which pushes reach the server varies from run to run.",
        "- **Median and spread.** Over the evaluation seeds, the median with the smallest and "
        "the largest value in brackets; a run that did not solve counts as more than any "
        "that did, so a median shown as `> budget` means half or more did not solve.",
        "- **Staleness.** The server's histogram of accepted pushes by how many versions the "
        "params a gradient was computed on were behind when it was applied "
        "(`ps.json`'s `staleness_histogram`, bins 0, 1, 2-3, 4-7, ...), at the end of each "
        "run; the median staleness is the bin that holds the median push of the "
        "configuration's runs together. One process and sync mode have no server and apply "
        "every gradient to the params it was computed on: staleness 0 by construction.",
        "- **Lambda for DC-ASGD**, chosen on the tuning seeds "
        f"{tune_seeds}, none of them an evaluation seed: every lambda of a grid (constant "
        f"form {', '.join(f'{v:g}' for v in CONSTANT_GRID)}; adaptive form "
        f"{', '.join(f'{v:g}' for v in ADAPTIVE_GRID)}; each includes the paper's default, "
        "0.04 and 2) runs `async6` with that form on every tuning seed, with the same budget; "
        "the lambda with the lowest median frames to "
        f"{TARGET:g} (unsolved counting as infinite; ties: more runs solved, then the smaller "
        "lambda) is the one the evaluation seeds run with. The evaluation seeds were used for "
        "no choice.",
        "",
        "## Results",
        "",
        f"| configuration | solved | median frames to {TARGET:g} [min–max] | median seconds "
        "from launch [min–max] | median seconds acting [min–max] | median staleness | "
        "pushes refused as too stale |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for summary in summaries:
        label = summary.label + (
            f" (lambda {summary.dc_lambda:g})" if summary.dc_lambda is not None else ""
        )
        if not summary.runs:
            lines.append(f"| {label} | not run | – | – | – | – | – |")
            continue
        if BY_NAME[summary.config].server:
            staleness = summary.staleness or "– (no histogram)"
            refused = f"{summary.stale_rejections:,}"
        else:
            staleness, refused = "0 (no server)", "–"
        lines.append(
            f"| {label} | {summary.solved}/{len(summary.runs)} | "
            f"{format_spread(summary.frames, lambda v: format_count(v, budget))} | "
            f"{format_spread(summary.seconds, format_seconds)} | "
            f"{format_spread(summary.acting, format_seconds)} | {staleness} | {refused} |"
        )
    for figure in figures:
        lines += ["", f"![{figure.stem}]({figure.name})"]
    if not any(summary.runs for summary in summaries):
        lines += ["", "**Not run yet**: no evaluation run has finished; the command above fills "
                  "in the table, the figures and the sections below."]  # fmt: skip
    lines += ["", "## What it shows", ""]
    said = reading({s.config: s for s in summaries}, budget)
    lines += [f"- {line}" for line in said] or ["- Nothing yet: no evaluation run has finished."]
    lines += [
        "- Seconds were measured on a 2-core machine, one run at a time: the processes of a "
        "run share its 2 cores (6 bundles get no more than 2), so seconds compare layouts "
        "on this machine only; frames are the measure that carries over.",
        "",
        "## Lambda, chosen on the tuning seeds",
        "",
        f"| form | lambda | tuning runs solved | median frames to {TARGET:g} | chosen |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setup in SETUPS:
        if not setup.is_tuned():
            continue
        scores = tuning.get(setup.name) or []
        if not scores:
            lines.append(f"| {setup.dc_asgd} | – | not run | – | |")
        for score in scores:
            mark = "yes" if score.dc_lambda == chosen.get(setup.name) else ""
            lines.append(
                f"| {setup.dc_asgd} | {score.dc_lambda:g} | {score.solved}/{score.runs} | "
                f"{format_count(score.median_frames, budget)} | {mark} |"
            )
    lines += [
        "",
        "## Staleness histograms",
        "",
        "Accepted pushes per staleness bin, the configuration's evaluation runs summed (each "
        "run's own histogram is in `results.csv` and `results.json`).",
        "",
        "| configuration | pushes by staleness (accepted) | refused as too stale |",
        "| --- | --- | --- |",
    ]
    for summary in summaries:
        if summary.runs and BY_NAME[summary.config].server:
            lines.append(
                f"| {summary.label} | {histogram_text(summary.histogram)} | "
                f"{summary.stale_rejections:,} |"
            )
    lines += [
        "",
        "## Every evaluation run",
        "",
        f"| configuration | seed | frames to {TARGET:g} | seconds from launch | seconds "
        "acting | stopped | median staleness | refused as too stale |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for summary in summaries:
        server = BY_NAME[summary.config].server
        for record in summary.runs:
            median = histogram_median(record.get("staleness_histogram") or {})
            lines.append(
                f"| {summary.config} | {record['seed']} | "
                f"{format_count(frames_or_inf(record), budget)} | "
                f"{format_seconds(seconds_or_inf(record))} | "
                f"{format_seconds(seconds_or_inf(record, 'run_seconds_to_solve'))} | "
                f"{record['stopped']} | {(median or '–') if server else '0 (no server)'} | "
                f"{stale_rejections([record]) if server else '–'} |"
            )
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], args: StudyArgs) -> list[Path]:
    """Write README.md, results.json, results.csv and the figures into args.docs from the
    records (those of args.seeds, args.tune_seeds and args.budget); the paths written."""
    args.docs.mkdir(parents=True, exist_ok=True)
    chosen = chosen_lambdas(records, args)
    tuning = {}
    for setup in SETUPS:
        if setup.is_tuned():
            runs = [
                r for r in records
                if r["config"] == setup.name and r["phase"] == "tune"
                and r["budget"] == args.budget and r["seed"] in args.tune_seeds
            ]  # fmt: skip
            tuning[setup.name] = select_lambda(runs, GRIDS[setup.dc_asgd])[1]
    summaries = [summarize(s, records, args, chosen.get(s.name)) for s in SETUPS]
    figures = write_plots(summaries, args.budget, args.docs)
    used = [r for s in summaries for r in s.runs] + [
        r for r in records
        if r["phase"] == "tune" and r["budget"] == args.budget and r["seed"] in args.tune_seeds
    ]  # fmt: skip
    document = {
        "target": TARGET,
        "window": WINDOW,
        "budget": args.budget,
        "seeds": list(args.seeds),
        "tune_seeds": list(args.tune_seeds),
        "grids": {form: list(grid) for form, grid in GRIDS.items()},
        "chosen_lambda": chosen,
        "tuning": {name: [score._asdict() for score in scores] for name, scores in tuning.items()},
        "summary": [
            {
                "config": s.config,
                "dc_lambda": s.dc_lambda,
                "runs": len(s.runs),
                "solved": s.solved,
                "frames_to_solve": None if s.frames is None else s.frames._asdict(),
                "seconds_to_solve": None if s.seconds is None else s.seconds._asdict(),
                "acting_seconds_to_solve": None if s.acting is None else s.acting._asdict(),
                "median_staleness": s.staleness,
                "stale_rejections": s.stale_rejections,
                "staleness_histogram": s.histogram,
            }
            for s in summaries
        ],
        "runs": used,
    }
    written = [args.docs / "results.json", args.docs / "results.csv", args.docs / "README.md"]
    # JSON has no infinity: a median that is not solved is written as null.
    written[0].write_text(json.dumps(finite_or_null(document), indent=1, sort_keys=True) + "\n")
    written[1].write_text(csv_text(used))
    written[2].write_text(readme_text(summaries, tuning, chosen, args, figures))
    return written + figures


def finite_or_null(value):
    """`value` with every infinite or NaN float (nested) replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


# ---- main --------------------------------------------------------------------------------------


def interrupt(signum, frame) -> None:
    """A signal handler that ends the study as Ctrl-C does."""
    raise KeyboardInterrupt


def run_study(args: StudyArgs, results: Path) -> int:
    """Every run the study still lacks: the plain configurations, the tuning runs, then the
    DC-ASGD configurations at their chosen lambdas; the count of runs that failed."""
    done = {record_key(r) for r in read_results(results)}
    failed = run_plans("runs", plain_plans(args), args, results, done)
    failed += run_plans("lambda tuning", tuning_plans(args), args, results, done)
    chosen = chosen_lambdas(read_results(results), args)
    for name, dc_lambda in chosen.items():
        if name in args.configs:
            tuned_on = ", ".join(map(str, args.tune_seeds))
            print(f"{name}: lambda {dc_lambda} chosen on tuning seeds {tuned_on}", flush=True)
    return failed + run_plans("DC-ASGD runs", tuned_plans(args, chosen), args, results, done)


def study(args: StudyArgs) -> int:
    """Run what is missing (unless --report-only), then write the report; 0, or 1 when a
    run failed."""
    check_args(args)
    results = args.out / "results.jsonl"
    failed = 0
    if not args.report_only:
        # SIGTERM too ends the study through KeyboardInterrupt, so the run in progress is
        # stopped (run_one's finally) rather than left running without its study.
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            failed = run_study(args, results)
        except KeyboardInterrupt:
            print("interrupted: the runs finished so far are kept; the same command goes on")
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    for path in write_report(read_results(results), args):
        print(f"wrote {path}", flush=True)
    if failed:
        print(f"{failed} run(s) failed; run the same command again to retry them", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the study; its exit status (2: bad input)."""
    return cli.run(study, StudyArgs, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
