"""The actor-replay-learner loop with a fake learner: when learning starts, where priorities
are written, what is checkpointed and how a resume continues."""

import dataclasses
import json
import logging
import threading

import jax
import numpy as np

from gorila_jax.bundle.loop import LoopCounters, LoopResult, make_replay, run_actor_learner
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.core.learner import StepMetrics
from gorila_jax.core.networks import make_network
from gorila_jax.envs import make_env


class FakeLearner:
    """An Updater that records each sample and answers with chosen TD errors."""

    def __init__(self, params, td_error: float = 0.5, q_spread: float | tuple = 0.25):
        """`q_spread`: the spread of every step, or one per window of 100 steps."""
        self.params = params
        self.updates = 0
        self.server_version = None
        self.td_error = td_error
        self.q_spread = q_spread
        self.samples = []

    def acting_params(self):
        return self.params

    def learn(self, sample, frames):
        self.updates += 1
        self.samples.append((sample.indices.copy(), frames))
        batch = len(sample.indices)
        td = np.full(batch, self.td_error, np.float32)
        q_spread = self.q_spread
        if isinstance(q_spread, tuple):
            q_spread = q_spread[min((self.updates - 1) // 100, len(q_spread) - 1)]
        return StepMetrics(
            np.float32(0.0), np.float32(-2.0), np.float32(self.td_error),
            np.float32(q_spread), td,
        )  # fmt: skip

    def should_stop(self):
        return False


def setting(tmp_path, **overrides):
    config = dataclasses.replace(
        cartpole_defaults(),
        run_dir=str(tmp_path),
        num_envs=2,
        batch_size=4,
        train_every=2,
        learning_starts=100,
        replay_capacity=500,
        log_every_seconds=1e6,
        **overrides,
    )
    env = make_env(config, seed=0)
    replay = make_replay(config, env, seed=0)
    return config, env, replay, make_network(config, env.num_actions)


def init_learner(network, env, td_error=0.5):
    return FakeLearner(network.init(jax.random.key(0), env.reset().obs), td_error)


def test_learning_starts_counts_the_replays_frames_and_priorities_come_from_td_errors(tmp_path):
    config, env, replay, network = setting(tmp_path, prioritized=True, priority_alpha=0.5)
    learner = init_learner(network, env, td_error=3.0)
    try:
        result = run_actor_learner(
            config, learner, env, replay, seed=0, run_dir=tmp_path, frame_budget=300
        )
    finally:
        env.close()
    assert result.frames == 300
    first_frames = learner.samples[0][1]
    assert first_frames >= config.learning_starts
    assert first_frames - 2 < config.learning_starts  # not later than needed (2 envs a step)
    # One learner step per train_every=2 agent steps once learning: (300 - 100) / 2.
    assert learner.updates == (300 - first_frames + 2) // 2
    # Every sampled index still valid holds (|td| + eps) ** alpha, written by the loop.
    sampled = np.unique(np.concatenate([indices for indices, _ in learner.samples]))
    valid = sampled[replay._is_valid_start(sampled)]
    expected = (3.0 + config.priority_eps) ** 0.5
    np.testing.assert_allclose(replay.priorities(valid), expected)


def test_a_collapsed_network_is_logged_and_warned_about_once(tmp_path, caplog):
    """Every learner window's mean Q spread goes to learner.jsonl; a network that gives
    every state the same values (spread 0) gets one warning line when it collapses, not
    one a window; a nearly dead one whose spread flickers just above the threshold (1e-5)
    between dead windows gets that one line too; one that truly recovers (spread 0.25) is
    warned about again when it collapses again; a healthy one (spread 0.25) gets none.
    Catches a check that never fires, one that fires on a healthy spread, and one that
    repeats itself every window or every flicker."""
    runs = {}
    cases = {
        "dead": 0.0,
        "healthy": 0.25,
        "flickering": (0.0, 1e-5, 0.0),
        "recovered": (0.0, 0.25, 0.0),
    }
    for name, q_spread in cases.items():
        run_dir = tmp_path / name
        config, env, replay, network = setting(run_dir)
        learner = FakeLearner(network.init(jax.random.key(0), env.reset().obs), 0.5, q_spread)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="gorila_jax"):
                # (700 - 100 + 2) // 2 = 301 learner steps: three windows of 100.
                run_actor_learner(
                    config, learner, env, replay, seed=0, run_dir=run_dir, frame_budget=700
                )
        finally:
            env.close()
        records = [json.loads(line) for line in (run_dir / "learner.jsonl").open()]
        assert len(records) == 3
        spreads = q_spread if isinstance(q_spread, tuple) else (q_spread,) * 3
        np.testing.assert_allclose([r["q_spread"] for r in records], spreads, rtol=1e-6)
        runs[name] = [r.getMessage() for r in caplog.records if "same Q-values" in r.getMessage()]
    assert runs["healthy"] == []
    assert len(runs["dead"]) == len(runs["flickering"]) == 1
    assert len(runs["recovered"]) == 2
    assert "q_spread 0 " in runs["dead"][0] and "--optimizer-eps" in runs["dead"][0]


def advance_policy_key(key_data: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """The policy's key after `steps` vector steps, written out independently of the loop:
    the policy splits its key in three each step and keeps the first part (actor.py)."""
    key = jax.random.wrap_key_data(np.asarray(key_data, dtype=np.uint32))
    for _ in range(steps):
        key = jax.random.split(key, 3)[0]
    return tuple(int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1))


def episodes_written(run_dir) -> int:
    with (run_dir / "episodes.csv").open() as handle:
        return len(handle.read().splitlines()) - 1  # less the header


def test_checkpoints_come_on_the_period_and_at_the_end_and_resume_continues(tmp_path):
    """Catches a resume that starts the policy from a fresh key (the seed's) instead of the
    saved one, one that restores the key but advances it differently, and one that restarts
    the episode count at 0 (the first sitting finishes episodes, so 0 would show)."""
    config, env, replay, network = setting(tmp_path, checkpoint_every_seconds=1e-9)
    learner = init_learner(network, env)
    saved: list[LoopCounters] = []
    stop = threading.Event()

    def checkpoint(counters):
        saved.append(counters)
        if len(saved) >= 5 and counters.episodes > 0:
            stop.set()  # like SIGTERM: the loop ends and checkpoints once more

    try:
        run_actor_learner(
            config, learner, env, replay, seed=0, run_dir=tmp_path, frame_budget=10_000,
            stop_event=stop, checkpoint=checkpoint,
        )  # fmt: skip
    finally:
        env.close()
    assert len(saved) >= 6 and saved[-1] == saved[-2]
    frames = [c.frames for c in saved]
    assert frames == sorted(frames) and frames[0] == 2  # 2 envs, 1 frame each per step
    assert all(c.agent_steps == c.frames for c in saved)  # CartPole: 1 frame per step
    assert saved[-1].episodes == episodes_written(tmp_path) > 0
    # Each step advanced the policy's key once, as the policy splits it.
    assert saved[1].policy_key == advance_policy_key(saved[0].policy_key, 1)
    assert saved[0].policy_key == advance_policy_key(
        tuple(int(v) for v in np.asarray(jax.random.key_data(jax.random.key(0)))), 1
    )

    def resume(run_dir, extra_frames: int) -> tuple[LoopResult, list[LoopCounters]]:
        config2, env2, replay2, _ = setting(run_dir)
        resumed: list[LoopCounters] = []
        try:
            result = run_actor_learner(
                config2, init_learner(network, env2), env2, replay2, seed=123, run_dir=run_dir,
                frame_budget=saved[-1].frames + extra_frames, resume=saved[-1],
                checkpoint=resumed.append,
            )  # fmt: skip
        finally:
            env2.close()
        return result, resumed

    # Resumed and stopped at once: the counters are the saved ones, the policy key included.
    result, resumed = resume(tmp_path / "at-once", 0)
    assert result.frames == saved[-1].frames and result.episodes == saved[-1].episodes
    assert resumed == [saved[-1]]
    assert resumed[-1].policy_key == saved[-1].policy_key

    # Resumed for 2 vector steps: the key continues from the saved one, not the seed's.
    result, resumed = resume(tmp_path / "again", 4)
    assert result.frames == saved[-1].frames + 4
    assert resumed[-1].agent_steps == saved[-1].agent_steps + 4
    assert resumed[-1].policy_key == advance_policy_key(saved[-1].policy_key, 2)

    # Resumed long enough to finish episodes of its own: the count continues from the saved.
    result, resumed = resume(tmp_path / "longer", 400)
    new_episodes = episodes_written(tmp_path / "longer")
    assert new_episodes > 0
    assert resumed[-1].episodes == result.episodes == saved[-1].episodes + new_episodes
