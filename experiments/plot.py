"""Plot one or more runs: episode returns (by episode and by frame, raw and smoothed), learner
statistics, and for distributed runs the parameter server's update rate and staleness.

python experiments/plot.py runs/cartpole                     # PNGs into runs/cartpole
python experiments/plot.py runs/a runs/b --out plots --smooth 50

Several runs are overlaid, each labelled with its directory name. Both layouts are read:
single-process (episodes.csv at the top) and distributed (bundle*/episodes.csv, merged in
order of wall time, and ps.json).
"""

import argparse
import sys
from pathlib import Path

from gorila_jax.cli import OneLineParser, positive_int
from gorila_jax.plots import PlotError, make_plots


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories to plot (overlaid, labelled by directory name)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for the PNGs (default: the run directory for one run, ./plots for several)",
    )
    parser.add_argument(
        "--smooth",
        type=positive_int,
        default=20,
        metavar="N",
        help="smoothed curves are the mean of the last N episodes (default: 20; 1 = raw only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("plots"))
    try:
        written = make_plots(args.run_dirs, out, window=args.smooth)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
