"""Plot one or more runs: episode returns (by episode, by frame and by hour, raw and smoothed),
learner statistics, and for distributed runs the parameter server's update rate and staleness.

python experiments/plot.py runs/cartpole                     # PNGs into runs/cartpole
python experiments/plot.py runs/a runs/b --out plots --smooth 50
python experiments/plot.py runs/pong --target 18             # when did the mean reach +18?

Several runs are overlaid, each labelled with its directory name. Both layouts are read:
single-process (episodes.csv at the top) and distributed (bundle*/episodes.csv, merged in
order of wall time, and ps.json).
"""

import dataclasses
import sys
from pathlib import Path

import tyro

from gorila_jax.core.cli import CommandLineError, run
from gorila_jax.run.plots import PlotError, first_reaching, load_run, make_plots


@dataclasses.dataclass(frozen=True)
class PlotArgs:
    """Plot runs."""

    run_dirs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories to plot (overlaid, labelled by directory name)."""
    out: Path | None = None
    """Directory for the PNGs (default: the run directory for one run, ./plots for several)."""
    smooth: int = 20
    """Smoothed curves are the mean of the last N episodes (1 = raw only)."""
    target: float | None = None
    """Also report, per run, the first moment the mean return of the last --target-window
    finished episodes reached this (frames, agent steps, hours, episodes)."""
    target_window: int = 100
    """Episodes averaged for --target."""


def plot(args: PlotArgs) -> int:
    if not args.run_dirs:
        raise CommandLineError("give at least one RUN_DIR")
    for name in ("smooth", "target_window"):
        if getattr(args, name) < 1:
            raise CommandLineError(f"--{name.replace('_', '-')} must be >= 1")
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("plots"))
    try:
        written = make_plots(list(args.run_dirs), out, window=args.smooth)
        for path in written:
            print(f"wrote {path}")
        if args.target is not None:
            for run_dir in args.run_dirs:
                reached = first_reaching(load_run(run_dir), args.target, args.target_window)
                print(f"{run_dir}: {reached}")
    except PlotError as error:
        raise CommandLineError(str(error)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and plot; the exit status."""
    return run(plot, PlotArgs, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
