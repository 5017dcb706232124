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

import sys

from gorila_jax.core.cli import CommandLineError, run
from gorila_jax.run.evaluate import EvaluationError, Settings, evaluate_run


def evaluate(settings: Settings) -> int:
    """Play, print each episode and the summary; the exit status."""

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
        raise CommandLineError(str(error)) from None
    print(
        f"{result['env_id']}, {result['episodes']} episodes, epsilon {result['epsilon']}: "
        f"mean {result['mean']:.2f} | median {result['median']:.2f} | std {result['std']:.2f} "
        f"| min {result['min']:g} | max {result['max']:g}"
    )
    print(f"wrote {result['json']}" + (f" and {result['gif']}" if result["gif"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and evaluate; the exit status."""
    return run(evaluate, Settings, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
