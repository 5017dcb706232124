"""Vectorised environments behind one small interface: envpool Atari and gymnasium CartPole.

Both auto-reset the same way (the step after an episode's last observation returns the
first observation of the next one, reward 0, and ignores the action), and both report, per
env, whether the observation is the FIRST of an episode, TERMINATED or TRUNCATED, which is
exactly what the replay memory stores. Episode returns for logging are tracked separately
from the training signal: unclipped rewards, summed over all lives of an Atari game.

`python -m gorila_jax.envs` lists the valid environment ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from gorila_jax.core.env_ids import (
    ATARI_FRAME_SHAPE,
    ATARI_FRAME_SKIP,
    ATARI_STACK,
    is_atari,
)
from gorila_jax.core.model import Model

if TYPE_CHECKING:
    from gorila_jax.core.config import Config


class EnvStep(NamedTuple):
    """One vector step: arrays with a leading env axis."""

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    first: np.ndarray


class Episode(NamedTuple):
    """A finished episode as logged: unclipped return, length in agent steps and frames."""

    env_index: int
    episode_return: float
    length: int


class EpisodeTracker:
    """Sums rewards per env until the true end of an episode and hands back finished ones."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)

    def update(self, rewards: np.ndarray, episode_over: np.ndarray) -> list[Episode]:
        """Add one step of rewards; return the episodes that ended on this step."""
        self.returns += rewards
        self.lengths += 1
        finished = [
            Episode(int(i), float(self.returns[i]), int(self.lengths[i]))
            for i in np.flatnonzero(episode_over)
        ]
        self.returns[episode_over] = 0.0
        self.lengths[episode_over] = 0
        return finished


def atari_make_arguments(
    config: Config, *, seed: int, training: bool, num_envs: int, screen: bool = False
) -> dict:
    """The `envpool.make` arguments of an Atari game, for training and evaluation alike.

    Training uses the config's episodic life and reward clipping; evaluation plays whole
    games with unclipped rewards. `screen=True` asks for the full 210x160 colour screen
    without a frame stack (what a recording shows) instead of the 84x84 grey stack of 4.
    """
    image = (
        {"stack_num": 1, "img_height": 210, "img_width": 160, "gray_scale": False}
        if screen
        else {
            "stack_num": ATARI_STACK,
            "img_height": ATARI_FRAME_SHAPE[0],
            "img_width": ATARI_FRAME_SHAPE[1],
        }
    )
    return {
        "task_id": config.env_id,
        "env_type": "gymnasium",
        "num_envs": num_envs,
        "batch_size": num_envs,
        "seed": seed,
        "episodic_life": training and config.episodic_life,
        "reward_clip": training and config.reward_clip,
        "noop_max": config.noop_max,
        "repeat_action_probability": config.sticky_action_prob,
        "max_episode_steps": max(1, config.max_episode_frames // ATARI_FRAME_SKIP),
        "frame_skip": ATARI_FRAME_SKIP,
        "use_fire_reset": False,
        **image,
    }


class AtariEnv:
    """envpool Atari with the DQN preprocessing, stepped asynchronously (send, then recv).

    Observations are uint8 (num_envs, 4, 84, 84). Between `send` and `recv` envpool steps the
    games on its own C++ threads, so the caller can run the learner meanwhile.
    """

    frames_per_step = ATARI_FRAME_SKIP
    stack_size = ATARI_STACK
    frame_shape = ATARI_FRAME_SHAPE
    frame_dtype = np.uint8

    def __init__(self, config: Config, *, seed: int, training: bool = True, num_envs=None):
        import envpool

        self.num_envs = num_envs or config.num_envs
        self._env = envpool.make(
            **atari_make_arguments(config, seed=seed, training=training, num_envs=self.num_envs)
        )
        self.num_actions = int(self._env.action_space.n)
        self.episodes = EpisodeTracker(self.num_envs)
        self._last = np.zeros(self.num_envs, bool)
        self._env_ids = np.arange(self.num_envs, dtype=np.int32)

    def reset(self) -> EnvStep:
        """Start every env; all observations are FIRST."""
        obs, _ = self._env.reset()
        zeros = np.zeros(self.num_envs, bool)
        self._last[:] = False
        return EnvStep(obs, np.zeros(self.num_envs, np.float32), zeros, zeros, ~zeros)

    def send(self, actions: np.ndarray) -> None:
        """Hand actions to envpool; the games step in the background until `recv`."""
        self._env.send(np.asarray(actions, np.int32), self._env_ids)

    def recv(self) -> tuple[EnvStep, list[Episode]]:
        """Collect the step started by `send`, in env order, and any finished episodes."""
        obs, reward, terminated, truncated, info = self._env.recv()
        order = np.argsort(info["env_id"])
        obs, reward = obs[order], reward[order]
        terminated, truncated = terminated[order], truncated[order]
        game_over = info["terminated"][order].astype(bool) | truncated
        first = self._last.copy()
        self._last = terminated | truncated
        finished = self.episodes.update(info["reward"][order], game_over)
        return EnvStep(obs, reward.astype(np.float32), terminated, truncated, first), finished

    def step(self, actions: np.ndarray) -> tuple[EnvStep, list[Episode]]:
        """Synchronous step: send then recv."""
        self.send(actions)
        return self.recv()

    @staticmethod
    def newest_frame(obs: np.ndarray) -> np.ndarray:
        """The one frame per env that the replay stores: the last of the stack."""
        return obs[:, -1]

    def close(self) -> None:
        """Release envpool's threads."""
        self._env.close()


class CartPoleEnv:
    """gymnasium's CartPole, vectorised in-process, with envpool-style next-step autoreset."""

    frames_per_step = 1
    stack_size = 1
    frame_dtype = np.float32

    def __init__(self, config: Config, *, seed: int, training: bool = True, num_envs=None):
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode

        del training
        self.num_envs = num_envs or config.num_envs
        self._env = gym.make_vec(
            config.env_id,
            num_envs=self.num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
        )
        self._seed = seed
        self.num_actions = int(self._env.single_action_space.n)
        self.frame_shape = tuple(self._env.single_observation_space.shape)
        self.episodes = EpisodeTracker(self.num_envs)
        self._last = np.zeros(self.num_envs, bool)
        self._pending: np.ndarray | None = None

    def reset(self) -> EnvStep:
        """Start every env; all observations are FIRST."""
        obs, _ = self._env.reset(seed=self._seed)
        zeros = np.zeros(self.num_envs, bool)
        self._last[:] = False
        return EnvStep(
            obs.astype(np.float32), np.zeros(self.num_envs, np.float32), zeros, zeros, ~zeros
        )

    def send(self, actions: np.ndarray) -> None:
        """Remember the actions; CartPole is stepped in `recv` (it is too cheap to overlap)."""
        self._pending = np.asarray(actions)

    def recv(self) -> tuple[EnvStep, list[Episode]]:
        """Step with the actions given to `send`."""
        obs, reward, terminated, truncated, _ = self._env.step(self._pending)
        first = self._last.copy()
        self._last = terminated | truncated
        finished = self.episodes.update(reward, self._last)
        step = EnvStep(
            obs.astype(np.float32), reward.astype(np.float32), terminated, truncated, first
        )
        return step, finished

    def step(self, actions: np.ndarray) -> tuple[EnvStep, list[Episode]]:
        """Synchronous step."""
        self.send(actions)
        return self.recv()

    @staticmethod
    def newest_frame(obs: np.ndarray) -> np.ndarray:
        """Vector observations are stored whole."""
        return obs

    def close(self) -> None:
        """Close the gymnasium vector env."""
        self._env.close()


def make_env(
    config: Config, *, seed: int, training: bool = True, num_envs: int | None = None
) -> AtariEnv | CartPoleEnv:
    """The vectorised env for `config.env_id` (training or evaluation settings)."""
    if is_atari(config.env_id):
        return AtariEnv(config, seed=seed, training=training, num_envs=num_envs)
    return CartPoleEnv(config, seed=seed, training=training, num_envs=num_envs)


def model_of(config: Config, *, seed: int | None = None, training: bool = True) -> Model:
    """The model of `config` (`Model.from_env`), from a one-env instance of its
    environment that is closed at once: for roles that run no environment (a server
    shard sizing its slice, `evaluate.py` before it plays)."""
    env = make_env(
        config, seed=config.seed if seed is None else seed, training=training, num_envs=1
    )
    try:
        return Model.from_env(config, env)
    finally:
        env.close()
