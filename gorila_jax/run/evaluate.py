"""Evaluate saved params: play episodes with evaluation settings and summarise the scores.

Evaluation settings are those of the DQN papers: epsilon-greedy with a small epsilon (0.05),
whole games (no episodic life), unclipped rewards, and for Atari up to `noop_max` no-op
actions at the start of each episode (from the run's config). Params are the flax msgpack
file a run writes (`gorila_jax.io.params_file`), checked against the network that the run's
config.yaml describes. The first episode can be recorded as a GIF (`gorila_jax.envs.recording`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tyro

from gorila_jax.core.config import Config, ConfigError, load_run_yaml, validate
from gorila_jax.core.env_ids import is_atari
from gorila_jax.envs.recording import GIF_MAX_FRAMES, AtariScreen, Recorder, write_episode_gif
from gorila_jax.io.files import write_atomically
from gorila_jax.io.params_file import (
    ParamsError,
    load_params,
    load_run_params,
    require_run_params,
)


class EvaluationError(ValueError):
    """Something that stops an evaluation before it starts; the message is one line."""


class EpisodeScore(NamedTuple):
    """One evaluation episode: unclipped return, agent steps, and whether the cap cut it."""

    episode_return: float
    steps: int
    truncated: bool


# ---- loading ------------------------------------------------------------------------------


def load_run_config(run_dir: Path) -> Config:
    """The config a run was trained with (RUN_DIR/config.yaml)."""
    if not run_dir.exists():
        raise EvaluationError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise EvaluationError(f"not a directory: {run_dir}")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvaluationError(f"no config.yaml in {run_dir} (is it a run directory?)")
    try:
        return validate(load_run_yaml(path))
    except ConfigError as error:
        raise EvaluationError(f"{path}: {error}") from None


def describe_network(network: Any, config: Config, num_actions: int) -> str:
    """A short name of the network, for error messages (e.g. 'MLP (128, 128), 2 actions')."""
    name = type(network).__name__
    if hasattr(network, "hidden"):
        name += f" {tuple(network.hidden)}"
    if config.dueling:
        name += " dueling"
    return f"{name} for {config.env_id}, {num_actions} actions"


# ---- playing ------------------------------------------------------------------------------


def play(
    config: Config,
    policy: Callable,
    params: Any,
    *,
    episodes: int,
    seed: int,
    epsilon: float,
    max_frames: int,
    recorder: Recorder | None = None,
    on_episode: Callable[[int, EpisodeScore], None] | None = None,
) -> list[EpisodeScore]:
    """Play `episodes` episodes with evaluation settings; the first is offered to `recorder`.

    An episode longer than `max_frames` frames ends there (truncated; its score is the
    return so far) and the next one starts in a freshly seeded env.
    """
    import jax

    from gorila_jax.envs import make_env

    atari = is_atari(config.env_id)
    env = make_env(config, seed=seed, training=False, num_envs=1)
    screen = AtariScreen(config, seed) if recorder is not None and atari else None
    key = jax.random.key(seed)
    scores: list[EpisodeScore] = []

    def snapshot(obs: np.ndarray, screen_picture: np.ndarray | None) -> Any:
        return (obs[0, -1].copy(), screen_picture) if atari else obs[0].copy()

    try:
        step = env.reset()
        picture = screen.reset() if screen is not None else None
        frames_per_step = env.frames_per_step
        steps, running, resetting = 0, 0.0, False
        while len(scores) < episodes:
            recording = recorder is not None and not scores
            if recording and not resetting:
                recorder.add(snapshot(step.obs, picture), f"step {steps}  return {running:g}")
            actions, key = policy(params, step.obs, key, epsilon)
            actions = np.asarray(actions)
            step, finished = env.step(actions)
            if resetting:  # this step only started the next episode (autoreset)
                resetting = False
                continue
            steps += 1
            running += float(step.reward[0])
            if recording and screen is not None:
                picture, reward, over = screen.step(actions)
                if reward != float(step.reward[0]) or over != bool(finished):
                    recorder.screen_in_sync = False
            score = None
            if finished:
                score = EpisodeScore(finished[0].episode_return, steps, False)
                score = score._replace(truncated=steps * frames_per_step >= max_frames)
                resetting = True
            elif steps * frames_per_step >= max_frames:
                score = EpisodeScore(running, steps, True)
            if score is None:
                continue
            if recording:
                caption = f"step {steps}  return {score.episode_return:g}"
                recorder.add(snapshot(step.obs, picture), caption, last=True)
                if screen is not None:
                    screen.close()
                    screen = None
            if score.truncated and not finished:  # start the next episode in a fresh env
                env.close()
                env = make_env(config, seed=seed + len(scores) + 1, training=False, num_envs=1)
                step = env.reset()
            scores.append(score)
            if on_episode is not None:
                on_episode(len(scores), score)
            steps, running = 0, 0.0
    finally:
        env.close()
        if screen is not None:
            screen.close()
    return scores


def summarize(returns: list[float]) -> dict[str, float]:
    """mean, median, std (population), min and max of the scores."""
    values = np.asarray(returns, np.float64)
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


@dataclasses.dataclass(frozen=True)
class Settings:
    """Evaluate a run's saved params with evaluation settings."""

    run_dir: tyro.conf.Positional[Path]
    """Run directory (holds config.yaml, and params.msgpack or a sharded server's
    shard*/params_slice.msgpack)."""
    episodes: int = 10
    """Episodes to play."""
    seed: int = 0
    """Seed of the environment and of the exploration."""
    epsilon: float = 0.05
    """Probability of a uniformly random action at each step."""
    params: Path | None = None
    """Flax msgpack params to evaluate (default: the run's own, see `load_run_params`)."""
    out: Path | None = None
    """Directory for evaluation.json and evaluation.gif (default: RUN_DIR)."""
    max_frames: int | None = None
    """End an episode after this many environment frames (Atari: 4 per agent step), scoring
    the return so far (default: the config's max_episode_frames)."""
    gif: bool = True
    """Record the first episode as OUT/evaluation.gif."""
    gif_max_frames: int = GIF_MAX_FRAMES
    """Pictures kept in the GIF at most (a long episode is sampled evenly)."""


def check_settings(settings: Settings) -> None:
    """Refuse impossible numbers before anything is loaded."""
    if settings.episodes < 1:
        raise EvaluationError(f"--episodes must be >= 1, got {settings.episodes}")
    if not 0.0 <= settings.epsilon <= 1.0:
        raise EvaluationError(f"--epsilon must be in [0, 1], got {settings.epsilon}")
    if settings.gif_max_frames < 2:
        raise EvaluationError(f"--gif-max-frames must be >= 2, got {settings.gif_max_frames}")
    if settings.max_frames is not None and settings.max_frames < 1:
        raise EvaluationError(f"--max-frames must be >= 1, got {settings.max_frames}")


def evaluate_run(
    settings: Settings, on_episode: Callable[[int, EpisodeScore], None] | None = None
) -> dict:
    """Load the run's config and params, play, write evaluation.json (and .gif); return it."""
    check_settings(settings)
    run_dir = Path(settings.run_dir)
    config = load_run_config(run_dir)
    params_path = Path(settings.params) if settings.params else None
    if params_path is not None and not params_path.is_file():
        raise EvaluationError(f"params file not found: {params_path}")
    if params_path is None:
        try:
            require_run_params(run_dir)
        except ParamsError as error:
            raise EvaluationError(str(error)) from None
    max_frames = settings.max_frames or config.max_episode_frames
    if is_atari(config.env_id):  # envpool truncates Atari episodes itself at the cap
        config = dataclasses.replace(config, max_episode_frames=max_frames)

    import jax

    from gorila_jax.core.actor import make_policy
    from gorila_jax.envs import model_of

    model = model_of(config, seed=settings.seed, training=False)
    network, num_actions = model.network, model.num_actions
    template = model.zeros()
    name = describe_network(network, config, num_actions)
    try:
        if params_path is None:
            loaded = load_run_params(run_dir, template, name)
            params, source, shard_versions = loaded.params, loaded.source, loaded.versions
        else:
            params = load_params(params_path, template, name)
            source, shard_versions = str(params_path), ()
    except ParamsError as error:
        raise EvaluationError(str(error)) from None
    params = jax.device_put(params)

    out_dir = Path(settings.out) if settings.out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(settings.gif_max_frames) if settings.gif else None
    scores = play(
        config,
        make_policy(network),
        params,
        episodes=settings.episodes,
        seed=settings.seed,
        epsilon=settings.epsilon,
        max_frames=max_frames,
        recorder=recorder,
        on_episode=on_episode,
    )
    returns = [s.episode_return for s in scores]
    result = {
        **summarize(returns),
        "episodes": len(scores),
        "env_id": config.env_id,
        "seed": settings.seed,
        "epsilon": settings.epsilon,
        "max_frames": max_frames,
        "noop_max": config.noop_max if is_atari(config.env_id) else 0,
        "params": source,
        # A sharded server's slices, each its shard's final version (they differ by the
        # pushes one shard refused or absorbed after another stopped).
        "shard_versions": list(shard_versions),
        "network": describe_network(network, config, num_actions),
        "returns": returns,
        "lengths": [s.steps for s in scores],
        "truncated": sum(s.truncated for s in scores),
        "gif": None,
    }
    if recorder is not None and recorder.snapshots:
        atari = is_atari(config.env_id)
        gif_path = write_episode_gif(recorder, out_dir / "evaluation.gif", atari=atari)
        result["gif"] = str(gif_path)
        result["gif_episode_return"] = returns[0]
        if atari:
            result["gif_screen"] = "colour" if recorder.screen_in_sync else "84x84 observation"
    json_path = out_dir / "evaluation.json"
    write_atomically(json_path, json.dumps(result, indent=1) + "\n")
    result["json"] = str(json_path)
    return result
