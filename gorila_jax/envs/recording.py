"""Recording one episode as a GIF: snapshots kept while playing, pictures drawn at the end.

Evaluation hands a :class:`Recorder` one snapshot per step of its first episode (a CartPole
state, or an Atari observation frame with the full colour screen of :class:`AtariScreen`);
the recorder keeps a bounded, evenly spread subset, and :func:`write_episode_gif` draws
them with captions and writes a looping GIF at the game's real speed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gorila_jax.core.config import Config

ATARI_STEPS_PER_SECOND = 15.0  # 60 Hz emulator, 4 frames per agent step
CARTPOLE_STEPS_PER_SECOND = 50.0  # gymnasium's tau = 0.02 s
GIF_MAX_FRAMES = 400
ATARI_GIF_SCALE = 3


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

        from gorila_jax.envs import atari_make_arguments

        self._env = envpool.make(
            **atari_make_arguments(config, seed=seed, training=False, num_envs=1, screen=True)
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


def write_episode_gif(recorder: Recorder, path: Path, *, atari: bool) -> Path:
    """The recorded episode as a GIF at the game's speed (every kept step one picture)."""
    steps_per_second = ATARI_STEPS_PER_SECOND if atari else CARTPOLE_STEPS_PER_SECOND
    return write_gif(path, recorder.pictures(atari), recorder.stride / steps_per_second)
