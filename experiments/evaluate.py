"""Evaluate a run's saved params: play episodes with evaluation settings and report the score.

python experiments/evaluate.py runs/cartpole
python experiments/evaluate.py runs/pong --episodes 30 --seed 1 --out eval/pong

Evaluation settings: epsilon-greedy with --epsilon (0.05), whole games (no episodic life),
unclipped rewards, and for Atari the run's no-op starts (up to noop_max no-ops). Prints the
mean, median, std, min and max of the score; writes them with the per-episode returns to
OUT/evaluation.json and a GIF of the first episode to OUT/evaluation.gif.

Exit status 2, with one line, for a missing run directory, config.yaml or params file, or
params made for another game or network than the run's config describes.
"""

import argparse
import sys
from pathlib import Path

from gorila_jax.cli import OneLineParser, positive_int
from gorila_jax.evaluate import EvaluationError, Settings, evaluate_run


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="run directory (holds config.yaml)"
    )
    parser.add_argument(
        "--episodes", type=positive_int, default=10, metavar="N", help="episodes to play (10)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the environment and of the exploration (0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for evaluation.json and evaluation.gif (default: RUN_DIR)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        metavar="FILE",
        help="flax msgpack params to evaluate (default: RUN_DIR/params.msgpack)",
    )
    parser.add_argument(
        "--epsilon",
        type=probability,
        default=0.05,
        metavar="E",
        help="probability of a uniformly random action at each step (0.05)",
    )
    parser.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        metavar="F",
        help="end an episode after F environment frames (Atari: 4 per agent step), scoring "
        "the return so far (default: the config's max_episode_frames)",
    )
    parser.add_argument(
        "--no-gif", action="store_true", help="do not record the first episode as a GIF"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        run_dir=args.run_dir,
        episodes=args.episodes,
        seed=args.seed,
        epsilon=args.epsilon,
        params=args.params,
        out=args.out,
        max_frames=args.max_frames,
        gif=not args.no_gif,
    )

    def report(index: int, score) -> None:
        cut = " (cut at --max-frames)" if score.truncated else ""
        print(
            f"episode {index}/{settings.episodes}: return {score.episode_return:g}, "
            f"{score.steps} steps{cut}",
            flush=True,
        )

    try:
        result = evaluate_run(settings, on_episode=report)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{result['env_id']}, {result['episodes']} episodes, epsilon {result['epsilon']}: "
        f"mean {result['mean']:.2f} | median {result['median']:.2f} | std {result['std']:.2f} "
        f"| min {result['min']:g} | max {result['max']:g}"
    )
    print(f"wrote {result['json']}" + (f" and {result['gif']}" if result["gif"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
