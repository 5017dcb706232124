"""Evaluate saved params: play episodes with evaluation settings, summarise, record a GIF.

Evaluation settings are those of the DQN papers: epsilon-greedy with a small epsilon (0.05),
whole games (no episodic life), unclipped rewards, and for Atari up to `noop_max` no-op
actions at the start of each episode (from the run's config). Params are the flax msgpack
file a run writes (`params.msgpack`: plain arrays, never pickle); before use they are checked
leaf by leaf against the network that the run's config.yaml describes, so params of another
game or network are refused with one line saying where they differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gorila_jax.config import Config, ConfigError, is_atari, load_yaml, validate

ATARI_STEPS_PER_SECOND = 15.0  # 60 Hz emulator, 4 frames per agent step
CARTPOLE_STEPS_PER_SECOND = 50.0  # gymnasium's tau = 0.02 s
GIF_MAX_FRAMES = 400
ATARI_GIF_SCALE = 3


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
        return validate(load_yaml(path, Config()))
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


def _compare(saved: Any, expected: Any, path: str) -> str | None:
    """Where `saved` differs from `expected` (nested dicts of arrays), or None."""
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            return f"{path or 'the root'} is a single array, the network expects a mapping"
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"{path}/{k}".lstrip("/") for k in missing))
            if extra:
                parts.append("unexpected " + ", ".join(f"{path}/{k}".lstrip("/") for k in extra))
            return "; ".join(parts)
        for key in expected:
            problem = _compare(saved[key], expected[key], f"{path}/{key}")
            if problem:
                return problem
        return None
    if isinstance(saved, dict):
        return f"{path.lstrip('/')} is a mapping, the network expects an array"
    saved_shape = tuple(np.shape(saved))
    expected_shape = tuple(np.shape(expected))
    if saved_shape != expected_shape:
        return f"{path.lstrip('/')} has shape {saved_shape}, the network expects {expected_shape}"
    return None


def load_params(path: Path, template: Any, network_name: str) -> Any:
    """Read flax msgpack params and check them against `template` (the network's own init).

    Raises EvaluationError when the file is missing, is not msgpack, or does not have the
    same structure and shapes as the template.
    """
    import flax.serialization

    if not path.is_file():
        raise EvaluationError(f"params file not found: {path}")
    try:
        saved = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several types for a bad file
        raise EvaluationError(
            f"{path} is not a flax msgpack params file ({type(error).__name__})"
        ) from None
    expected = flax.serialization.to_state_dict(template)
    problem = _compare(saved, expected, "")
    if problem:
        raise EvaluationError(f"{path} does not fit the run's network ({network_name}): {problem}")
    try:
        restored = flax.serialization.from_state_dict(template, saved)
    except (ValueError, KeyError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EvaluationError(
            f"{path} does not fit the run's network ({network_name}): {first}"
        ) from None
    import jax

    return jax.tree.map(lambda leaf, like: np.asarray(leaf, like.dtype), restored, template)


# ---- rendering ----------------------------------------------------------------------------


def render_cartpole(state: np.ndarray, width: int = 360, height: int = 240) -> np.ndarray:
    """An RGB picture of a CartPole state (x, x_dot, theta, theta_dot), like gymnasium's.

    Drawn with PIL, so recording needs no pygame. Track, cart, pole and axle at gymnasium's
    proportions: the screen spans x in [-2.4, 2.4], the pole is 1 m long.
    """
    from PIL import Image, ImageDraw

    x, _, theta, _ = (float(v) for v in np.asarray(state).reshape(-1)[:4])
    scale = width / 4.8
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    track_y = height - height // 4
    cart_w, cart_h = 0.4 * scale, 0.24 * scale
    pole_len, pole_w = 1.0 * scale, 0.08 * scale
    cart_x = x * scale + width / 2
    draw.line([(0, track_y), (width, track_y)], fill=(0, 0, 0), width=1)
    draw.rectangle(
        [cart_x - cart_w / 2, track_y - cart_h / 2, cart_x + cart_w / 2, track_y + cart_h / 2],
        fill=(0, 0, 0),
    )
    axle = np.array([cart_x, track_y - cart_h / 4])
    along = np.array([math.sin(theta), -math.cos(theta)])  # image y grows downwards
    across = np.array([-along[1], along[0]]) * pole_w / 2
    corners = [axle - across, axle + across, axle + across + along * pole_len]
    corners.append(axle - across + along * pole_len)
    draw.polygon([tuple(c) for c in corners], fill=(202, 152, 101))
    radius = pole_w / 2
    draw.ellipse(
        [axle[0] - radius, axle[1] - radius, axle[0] + radius, axle[1] + radius],
        fill=(129, 132, 203),
    )
    return np.asarray(image)


def render_atari(frame: np.ndarray, scale: int = ATARI_GIF_SCALE) -> np.ndarray:
    """An 84x84 grey observation frame, upscaled, as RGB."""
    frame = np.repeat(np.repeat(np.asarray(frame), scale, axis=0), scale, axis=1)
    return np.repeat(frame[:, :, None], 3, axis=2)


def with_caption(image: np.ndarray, text: str) -> np.ndarray:
    """The image with a strip of text below it."""
    from PIL import Image, ImageDraw

    strip = 18
    height, width = image.shape[:2]
    canvas = Image.new("RGB", (width, height + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    ImageDraw.Draw(canvas).text((4, height + 3), text, fill=(0, 0, 0))
    return np.asarray(canvas)


class Recorder:
    """Keeps at most `max_frames` snapshots of one episode, evenly spread over all of it.

    Every `stride`-th step is kept; when the buffer is full every other snapshot is dropped
    and the stride doubles, so an episode of any length fits in bounded memory. Snapshots
    are whatever the player hands in (an observation, a screen); pictures are drawn at the
    end by `pictures`.
    """

    def __init__(self, max_frames: int = GIF_MAX_FRAMES):
        self.max_frames = max(2, max_frames)
        self.stride = 1
        self.snapshots: list[tuple[Any, str]] = []
        self.screen_in_sync = True
        self._step = 0

    def add(self, snapshot: Any, caption: str, *, last: bool = False) -> None:
        """Offer one step's snapshot; the episode's last one is always kept."""
        if self._step % self.stride == 0 or last:
            self.snapshots.append((snapshot, caption))
            if len(self.snapshots) > self.max_frames:
                self.snapshots = self.snapshots[::2]
                self.stride *= 2
        self._step += 1

    def pictures(self, atari: bool) -> list[np.ndarray]:
        """RGB pictures with captions: CartPole drawn from its state; Atari from the full
        colour screen when the screen env stayed in step, else from the 84x84 observation."""
        images = []
        for snapshot, caption in self.snapshots:
            if not atari:
                image = render_cartpole(snapshot)
            elif snapshot[1] is not None and self.screen_in_sync:
                image = np.repeat(np.repeat(snapshot[1], 2, axis=0), 2, axis=1)
            else:
                image = render_atari(snapshot[0])
            images.append(with_caption(image, caption))
        return images


class AtariScreen:
    """A second envpool game that shows the full 210x160 colour screen of the evaluated one.

    It is made with the evaluation env's options and seed but colour, full size and no frame
    stack, and is stepped with the same actions: the emulator is deterministic, so both play
    the same game. Rewards and episode ends are compared every step; on any difference the
    recording falls back to the 84x84 observations.
    """

    def __init__(self, config: Config, seed: int):
        import envpool

        from gorila_jax.envs import ATARI_FRAME_SKIP

        self._env = envpool.make(
            config.env_id,
            env_type="gymnasium",
            num_envs=1,
            batch_size=1,
            seed=seed,
            episodic_life=False,
            reward_clip=False,
            noop_max=config.noop_max,
            repeat_action_probability=config.sticky_action_prob,
            max_episode_steps=max(1, config.max_episode_frames // ATARI_FRAME_SKIP),
            frame_skip=ATARI_FRAME_SKIP,
            stack_num=1,
            img_height=210,
            img_width=160,
            gray_scale=False,
            use_fire_reset=False,
        )

    def reset(self) -> np.ndarray:
        """The first screen, (210, 160, 3) uint8."""
        obs, _ = self._env.reset()
        return obs[0].transpose(1, 2, 0)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """(screen, reward, game over) after the same actions as the evaluated env."""
        obs, reward, terminated, truncated, _ = self._env.step(np.asarray(actions, np.int32))
        return obs[0].transpose(1, 2, 0), float(reward[0]), bool(terminated[0] | truncated[0])

    def close(self) -> None:
        """Release envpool's threads."""
        self._env.close()


def write_gif(path: Path, frames: list[np.ndarray], seconds_per_frame: float) -> Path:
    """An endlessly looping GIF (pillow, through imageio)."""
    import imageio.v3 as iio

    duration_ms = max(20, round(1000 * seconds_per_frame))
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=duration_ms, loop=0)
    return path


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
    """What to evaluate and how (the CLI's flags)."""

    run_dir: Path
    episodes: int = 10
    seed: int = 0
    epsilon: float = 0.05
    params: Path | None = None
    out: Path | None = None
    max_frames: int | None = None
    gif: bool = True
    gif_max_frames: int = GIF_MAX_FRAMES


def check_settings(settings: Settings) -> None:
    """Refuse impossible numbers before anything is loaded."""
    if settings.episodes < 1:
        raise EvaluationError(f"--episodes must be >= 1, got {settings.episodes}")
    if not 0.0 <= settings.epsilon <= 1.0:
        raise EvaluationError(f"--epsilon must be in [0, 1], got {settings.epsilon}")
    if settings.max_frames is not None and settings.max_frames < 1:
        raise EvaluationError(f"--max-frames must be >= 1, got {settings.max_frames}")


def evaluate_run(
    settings: Settings, on_episode: Callable[[int, EpisodeScore], None] | None = None
) -> dict:
    """Load the run's config and params, play, write evaluation.json (and .gif); return it."""
    check_settings(settings)
    run_dir = Path(settings.run_dir)
    config = load_run_config(run_dir)
    params_path = Path(settings.params) if settings.params else run_dir / "params.msgpack"
    if not params_path.is_file():
        raise EvaluationError(f"params file not found: {params_path}")
    max_frames = settings.max_frames or config.max_episode_frames
    if is_atari(config.env_id):  # envpool truncates Atari episodes itself at the cap
        config = dataclasses.replace(config, max_episode_frames=max_frames)

    import jax

    from gorila_jax.actor import make_policy
    from gorila_jax.envs import make_env
    from gorila_jax.networks import make_network

    probe = make_env(config, seed=settings.seed, training=False, num_envs=1)
    try:
        num_actions = probe.num_actions
        example_obs = probe.reset().obs
    finally:
        probe.close()
    network = make_network(config, num_actions)
    template = jax.device_get(network.init(jax.random.key(0), example_obs))
    params = load_params(params_path, template, describe_network(network, config, num_actions))
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
        "params": str(params_path),
        "network": describe_network(network, config, num_actions),
        "returns": returns,
        "lengths": [s.steps for s in scores],
        "truncated": sum(s.truncated for s in scores),
        "gif": None,
    }
    if recorder is not None and recorder.snapshots:
        atari = is_atari(config.env_id)
        steps_per_second = ATARI_STEPS_PER_SECOND if atari else CARTPOLE_STEPS_PER_SECOND
        gif_path = write_gif(
            out_dir / "evaluation.gif",
            recorder.pictures(atari),
            recorder.stride / steps_per_second,
        )
        result["gif"] = str(gif_path)
        result["gif_episode_return"] = returns[0]
        if atari:
            result["gif_screen"] = "colour" if recorder.screen_in_sync else "84x84 observation"
    json_path = out_dir / "evaluation.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(json_path)
    result["json"] = str(json_path)
    return result
