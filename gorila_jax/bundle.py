"""A bundle's actor-replay-learner loop, shared by single-process and distributed training.

The loop owns the envs, the replay memory and the epsilon-greedy policy. What a learner
step does with its gradients is the `Updater`'s business: single-process training applies
them locally (`gorila_jax.single_process`), a Gorila bundle pushes them to the parameter
server. The envs step on envpool's threads while the learner runs: actions are sent, the
learner steps that are due run, then the observations are received.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from gorila_jax.actor import linear_epsilon, make_policy
from gorila_jax.config import Config
from gorila_jax.envs import AtariEnv, CartPoleEnv
from gorila_jax.metrics import Progress, RunLogger
from gorila_jax.networks import make_network
from gorila_jax.replay import PrioritizedReplay, Replay, Sample

LEARNER_LOG_EVERY_STEPS = 100


class Updater(Protocol):
    """What the loop needs from a learner: params to act with, and a learning step."""

    updates: int

    def acting_params(self) -> Any: ...

    def learn(self, sample: Sample, frames: int) -> Any: ...

    def should_stop(self) -> bool: ...


class LoopResult(NamedTuple):
    """Counters at the end of a bundle's loop."""

    frames: int
    agent_steps: int
    updates: int
    episodes: int
    mean_recent_return: float
    seconds: float


def make_replay(config: Config, env: AtariEnv | CartPoleEnv, *, seed: int) -> Replay:
    """The replay memory the config asks for, shaped for `env`'s frames."""
    common = dict(
        capacity=config.replay_capacity,
        num_envs=env.num_envs,
        frame_shape=tuple(env.frame_shape),
        frame_dtype=env.frame_dtype,
        stack_size=env.stack_size,
        n_step=config.n_step,
        gamma=config.gamma,
        num_actions=env.num_actions,
        seed=seed,
    )
    if not config.prioritized:
        return Replay(**common)
    beta_steps = max(1, (config.total_frames // env.frames_per_step) // config.train_every)
    return PrioritizedReplay(
        **common,
        alpha=config.priority_alpha,
        beta_start=config.priority_beta_start,
        beta_end=1.0,
        beta_steps=beta_steps,
        epsilon=config.priority_eps,
    )


def run_actor_learner(
    config: Config,
    updater: Updater,
    env: AtariEnv | CartPoleEnv,
    replay: Replay,
    *,
    seed: int,
    run_dir: Path,
    bundle: int = 0,
    frame_budget: int | None = None,
    epsilon_frame_scale: int = 1,
    start_frames: int = 0,
    stop_event: threading.Event | None = None,
) -> LoopResult:
    """Act, store, and learn until this bundle's frame budget is spent or something stops it.

    `frame_budget` is this bundle's share of `config.total_frames` (all of it by default).
    Epsilon follows the run's frames, estimated as this bundle's frames times
    `epsilon_frame_scale` (the number of bundles). The loop ends early when the updater
    says so or `stop_event` is set (a signal). A resumed bundle starts at `start_frames`
    (its count before the interruption); its replay is new, so learning waits for
    `learning_starts` frames again.
    """
    stop_event = stop_event or threading.Event()

    def report(frames: int, agent_steps: int, epsilon: float, force: bool = False) -> None:
        progress.maybe_print(
            frames=frames,
            agent_steps=agent_steps,
            epsilon=epsilon,
            mean_return=logger.mean_recent_return(),
            updates=updater.updates,
            server_version=getattr(updater, "server_version", None),
            force=force,
        )

    frame_budget = config.total_frames if frame_budget is None else frame_budget
    network = make_network(config, env.num_actions)
    policy = make_policy(network)
    key = jax.random.key(seed)
    logger = RunLogger(run_dir, bundle=bundle)
    progress = Progress(
        frame_budget,
        config.log_every_seconds,
        prefix=f"[bundle {bundle}] ",
        start_frames=start_frames,
    )
    steps_per_vector_step = env.num_envs
    frames_per_vector_step = env.num_envs * env.frames_per_step
    start = time.time()
    frames, agent_steps = start_frames, 0
    updates_due = 0.0
    learner_window: list[Any] = []
    step = env.reset()
    epsilon = config.epsilon_start
    try:
        while frames < frame_budget and not updater.should_stop() and not stop_event.is_set():
            epsilon = linear_epsilon(
                frames * epsilon_frame_scale,
                start=config.epsilon_start,
                end=config.epsilon_end,
                decay_frames=config.epsilon_decay_frames,
            )
            actions, key = policy(updater.acting_params(), step.obs, key, epsilon)
            actions = np.asarray(actions)
            replay.add(
                env.newest_frame(step.obs),
                actions,
                step.reward,
                step.terminated,
                step.truncated,
                step.first,
            )
            env.send(actions)
            frames += frames_per_vector_step
            agent_steps += steps_per_vector_step
            learning = frames - start_frames >= config.learning_starts
            if learning and replay.can_sample(config.batch_size):
                updates_due += steps_per_vector_step / config.train_every
                while updates_due >= 1.0:
                    updates_due -= 1.0
                    metrics = updater.learn(replay.sample(config.batch_size), frames)
                    if metrics is not None:
                        learner_window.append(metrics)
                    if len(learner_window) >= LEARNER_LOG_EVERY_STEPS:
                        logger.learner(summarize(learner_window, frames, updater.updates))
                        learner_window = []
            step, finished = env.recv()
            logger.episodes(finished, frames)
            report(frames, agent_steps, epsilon)
        report(frames, agent_steps, epsilon, force=True)
        return LoopResult(
            frames=frames,
            agent_steps=agent_steps,
            updates=updater.updates,
            episodes=logger.episode_count,
            mean_recent_return=logger.mean_recent_return(),
            seconds=time.time() - start,
        )
    finally:
        logger.close()


def summarize(window: list[Any], frames: int, updates: int) -> dict:
    """Mean learner metrics over a window of steps, as plain floats."""
    values = jax.device_get([(m.loss, m.mean_q, m.mean_abs_td) for m in window])
    loss, mean_q, mean_abs_td = (float(np.mean(column)) for column in zip(*values, strict=True))
    return {
        "frames": frames,
        "updates": updates,
        "loss": loss,
        "mean_q": mean_q,
        "mean_abs_td": mean_abs_td,
    }
