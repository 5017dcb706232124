"""A bundle's actor-replay-learner loop, shared by single-process and distributed training.

The loop owns the envs, the replay memory and the epsilon-greedy policy. What a learner
step does with its gradients is the `Updater`'s business: single-process training applies
them locally (`gorila_jax.run.single_process`), a Gorila bundle pushes them to the parameter
server. The envs step on envpool's threads while the learner runs: actions are sent, the
learner steps that are due run, then the observations are received.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from gorila_jax.core.actor import linear_epsilon, make_policy
from gorila_jax.core.config import Config
from gorila_jax.core.learner import StepMetrics
from gorila_jax.core.networks import make_network
from gorila_jax.core.replay import PrioritizedReplay, Replay, Sample
from gorila_jax.envs import AtariEnv, CartPoleEnv
from gorila_jax.io.metrics import Progress, RunLogger

log = logging.getLogger(__name__)

LEARNER_LOG_EVERY_STEPS = 100
COLLAPSED_Q_SPREAD = 1e-6
"""A learner window whose Q spread over states is at most this (times |mean Q| when that is
above 1) comes from a network that tells no state apart: it is reported as collapsed."""
RECOVERED_Q_SPREAD = 1e-4
"""A collapsed network counts as recovered (and a later collapse is warned about again) only
once a window's spread exceeds this, on the same scale: a nearly dead network's spread
flickers around COLLAPSED_Q_SPREAD (1e-7 to 1e-5 in a seed-1 Pong run) and would otherwise
warn every few windows. A healthy Nature CNN on Pong starts near 1e-3."""


class Updater(Protocol):
    """Everything the loop uses of a learner: params to act with, a learning step, counters.

    `LocalLearner` (single process) applies its own updates; `RemoteLearner` (a Gorila
    bundle) pushes gradients to the parameter server and pulls params back.
    """

    updates: int
    """Learner steps this process has taken."""
    server_version: int | None
    """Server updates seen so far: the newest version, or with a sharded server the mean
    of the shards' versions (None without a server)."""

    def acting_params(self) -> Any:
        """The params the policy acts with now."""
        ...

    def learn(self, sample: Sample, frames: int) -> Any:
        """One learner step on `sample`; its metrics (with per-sample `td_errors`) or None
        when the step was skipped."""
        ...

    def should_stop(self) -> bool:
        """Whether the run is over for this learner (the server said stop)."""
        ...


class LoopCounters(NamedTuple):
    """A bundle's own position in its run, saved with its replay so a resume continues it."""

    frames: int
    agent_steps: int
    episodes: int
    policy_key: tuple[int, ...]  # the raw data of the epsilon-greedy policy's jax key

    def to_dict(self) -> dict:
        """Plain JSON-able values."""
        return {**self._asdict(), "policy_key": list(self.policy_key)}

    @classmethod
    def from_dict(cls, values: dict) -> LoopCounters:
        """Counters from `to_dict`'s output; ValueError when a value is missing or bad."""
        try:
            counters = cls(
                frames=int(values["frames"]),
                agent_steps=int(values["agent_steps"]),
                episodes=int(values["episodes"]),
                policy_key=tuple(int(v) for v in values["policy_key"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"bad loop counters ({error!r})") from None
        if not all(0 <= v < 2**62 for v in counters[:3]):
            raise ValueError("bad loop counters (frames, agent steps or episodes out of range)")
        key_size = np.asarray(jax.random.key_data(jax.random.key(0))).size
        if len(counters.policy_key) != key_size or not all(
            0 <= v < 2**32 for v in counters.policy_key
        ):
            raise ValueError(f"bad loop counters (policy key must be {key_size} uint32 values)")
        return counters


class Turn(NamedTuple):
    """What one turn of the loop does besides acting: learner steps (when due), a
    checkpoint at its end, and whether the loop ends after it."""

    learn: bool
    stop: bool
    checkpoint: bool


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
    resume: LoopCounters | None = None,
    checkpoint: Callable[[LoopCounters], None] | None = None,
    lockstep: Callable[[Turn], Turn] | None = None,
) -> LoopResult:
    """Act, store, and learn until this bundle's frame budget is spent or something stops it.

    `frame_budget` is this bundle's share of `config.total_frames` (all of it by default).
    Epsilon follows the run's frames, estimated as this bundle's frames times
    `epsilon_frame_scale` (the number of bundles). The loop ends early when the updater
    says so or `stop_event` is set (a signal).

    Learning starts once the replay holds `learning_starts` frames (counted from the replay's
    own adds, so a replay restored from a checkpoint learns at once). A bundle resumed with
    its replay passes the saved `resume` counters (frames, agent steps, episodes, policy
    key; frames are the larger of the saved ones and `start_frames`, the server's count);
    one without starts at `start_frames` with an empty replay.
    `checkpoint` is called with the current counters every `checkpoint_every_seconds` and
    once when the loop ends, on its budget or on a signal.

    `lockstep` (a sync run, whose processes take every learner step together) turns this
    process's `Turn`, made once per turn after the actions are sent, into the one every
    process takes: learner steps only when every process can take them, a checkpoint or
    the end (a signal, `updater.should_stop()`) when any process asks for one. So the
    processes run the same turns and call `updater.learn` the same number of times.
    """
    stop_event = stop_event or threading.Event()

    def report(frames: int, agent_steps: int, epsilon: float, force: bool = False) -> None:
        progress.maybe_print(
            frames=frames,
            agent_steps=agent_steps,
            epsilon=epsilon,
            mean_return=logger.mean_recent_return(),
            updates=updater.updates,
            server_version=updater.server_version,
            force=force,
        )

    frame_budget = config.total_frames if frame_budget is None else frame_budget
    network = make_network(config, env.num_actions)
    policy = make_policy(network)
    key = jax.random.key(seed)
    if resume is not None:
        # A distributed bundle's replay checkpoint may be older than the count the server
        # kept for it (a bundle killed outright resumes from its last periodic one): the
        # frame count, and so epsilon and the budget, never go backwards.
        start_frames = max(start_frames, resume.frames)
        key = jax.random.wrap_key_data(np.asarray(resume.policy_key, dtype=np.uint32))
    logger = RunLogger(run_dir, bundle=bundle)
    if resume is not None:
        logger.episode_count = resume.episodes
    progress = Progress(
        frame_budget,
        config.log_every_seconds,
        prefix=f"[bundle {bundle}] ",
        start_frames=start_frames,
        start_agent_steps=0 if resume is None else resume.agent_steps,
    )
    steps_per_vector_step = env.num_envs
    frames_per_vector_step = env.num_envs * env.frames_per_step
    start = time.time()
    frames = start_frames
    agent_steps = 0 if resume is None else resume.agent_steps
    last_checkpoint = time.monotonic()

    def counters() -> LoopCounters:
        key_data = np.asarray(jax.random.key_data(key)).reshape(-1)
        return LoopCounters(frames, agent_steps, logger.episode_count, tuple(map(int, key_data)))

    def stopping() -> bool:
        return updater.should_stop() or stop_event.is_set()

    updates_due = 0.0
    learner_window: list[Any] = []
    was_collapsed = False  # warn when the network collapses, not on every collapsed window
    step = env.reset()
    epsilon = config.epsilon_start
    turn = Turn(learn=False, stop=False, checkpoint=False)
    try:
        while frames < frame_budget and not turn.stop and (lockstep is not None or not stopping()):
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
            learning = replay.num_adds * frames_per_vector_step >= config.learning_starts
            turn = Turn(
                learn=learning and replay.can_sample(config.batch_size),
                stop=lockstep is not None and stopping(),
                checkpoint=checkpoint is not None
                and time.monotonic() - last_checkpoint >= config.checkpoint_every_seconds,
            )
            if lockstep is not None:
                turn = lockstep(turn)
            if turn.learn:
                updates_due += steps_per_vector_step / config.train_every
                while updates_due >= 1.0:
                    updates_due -= 1.0
                    sample = replay.sample(config.batch_size)
                    metrics = updater.learn(sample, frames)
                    if metrics is not None:
                        if replay.prioritized:  # the one place priorities change
                            replay.update_priorities(sample.indices, np.asarray(metrics.td_errors))
                        learner_window.append(metrics)
                    if len(learner_window) >= LEARNER_LOG_EVERY_STEPS:
                        record = summarize(learner_window, frames, updater.updates)
                        logger.learner(record)
                        learner_window = []
                        if not was_collapsed and collapsed(record):
                            log.warning(collapse_warning(record))
                            was_collapsed = True
                        elif was_collapsed and recovered(record):
                            was_collapsed = False
            step, finished = env.recv()
            logger.episodes(finished, frames)
            report(frames, agent_steps, epsilon)
            if turn.checkpoint:
                checkpoint(counters())
                last_checkpoint = time.monotonic()
        report(frames, agent_steps, epsilon, force=True)
        if checkpoint is not None:
            checkpoint(counters())
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
    """Mean learner metrics over a window of steps (every `StepMetrics` scalar), as plain
    floats."""
    keys = tuple(name for name in StepMetrics._fields if name != "td_errors")
    values = jax.device_get([tuple(getattr(m, key) for key in keys) for m in window])
    means = (float(np.mean(column)) for column in zip(*values, strict=True))
    return {"frames": frames, "updates": updates, **dict(zip(keys, means, strict=True))}


def collapsed(record: dict) -> bool:
    """Whether a learner window's network gave (near enough) every state the same values."""
    return record["q_spread"] <= COLLAPSED_Q_SPREAD * max(1.0, abs(record["mean_q"]))


def recovered(record: dict) -> bool:
    """Whether a learner window's network tells states apart again after a collapse."""
    return record["q_spread"] > RECOVERED_Q_SPREAD * max(1.0, abs(record["mean_q"]))


def collapse_warning(record: dict) -> str:
    """The one line that says a learner's network has collapsed, and what to do about it
    (the process's logger names the bundle)."""
    return (
        "the network gives every state the same Q-values (q_spread "
        f"{record['q_spread']:.2g} over the last {LEARNER_LOG_EVERY_STEPS} learner steps, at "
        f"{record['frames']:,} frames): it has collapsed (dead ReLUs) and is unlikely to learn "
        "again; restart with a lower --learning-rate or a higher --optimizer-eps"
    )
