"""The environments: a lost life ends an episode for bootstrapping but not for logging, the
logged return is the unclipped whole-game score, and every row of a batch is its own env.

References: raw envpool games made here with explicit arguments, single-env copies of a
batch, and a fake envpool that answers out of order.
"""

import dataclasses

import numpy as np
import pytest

from gorila_jax import envs
from gorila_jax.core.config import Config, cartpole_defaults
from gorila_jax.envs import Episode, EpisodeTracker, make_env


def atari_config(env_id: str, **overrides) -> Config:
    return dataclasses.replace(Config(), env_id=env_id, **overrides)


def raw_env(env_id: str, seed: int, *, episodic_life: bool, reward_clip: bool):
    """An envpool game with the DQN preprocessing spelled out here, not by gorila_jax."""
    import envpool

    return envpool.make(
        env_id, env_type="gymnasium", num_envs=1, batch_size=1, seed=seed,
        episodic_life=episodic_life, reward_clip=reward_clip, noop_max=30,
        repeat_action_probability=0.0, max_episode_steps=27_000, frame_skip=4,
        use_fire_reset=False, stack_num=4, img_height=84, img_width=84,
    )  # fmt: skip


def test_training_env_ends_bootstrapping_at_each_life_and_logs_whole_unclipped_games():
    """Breakout in training settings, random actions for one whole game, against a raw
    envpool game with unclipped rewards stepped with the same actions.

    Catches a logged episode cut at a lost life (5 "episodes" per game), a logged return
    made of the clipped training rewards, a training reward left unclipped, and a lost life
    that does not end the episode for bootstrapping (terminated)."""
    config = atari_config("Breakout-v5", episodic_life=True, reward_clip=True)
    env = make_env(config, seed=4, training=True, num_envs=1)
    reference = raw_env("Breakout-v5", 4, episodic_life=True, reward_clip=False)
    rng = np.random.default_rng(0)
    try:
        step = env.reset()
        _, info = reference.reset()
        lives = int(info["lives"][0])
        raw_total, clipped_total, terminations, finished = 0.0, 0.0, 0, []
        for _ in range(5000):
            action = rng.integers(0, env.num_actions, 1)
            step, done = env.step(action)
            _, raw, terminated, _, info = reference.step(action.astype(np.int32))
            assert step.reward[0] == np.sign(raw[0])  # training reward: clipped
            assert step.terminated[0] == terminated[0]
            raw_total += float(raw[0])
            clipped_total += float(step.reward[0])
            terminations += int(step.terminated[0])
            finished += done
            if info["lives"][0] == 0 and terminated[0]:  # the reference's game over
                break
        else:
            pytest.fail("no game over in 5000 steps")
    finally:
        env.close()
        reference.close()
    assert lives == 5 and terminations == 5  # bootstrapping ends at every lost life
    assert len(finished) == 1  # but the game is logged once, whole
    assert finished[0].episode_return == raw_total
    assert finished[0].env_index == 0


def test_training_rewards_are_clipped_and_logged_returns_are_not():
    """Space Invaders scores 5 to 30 per invader: the logged return must be the game's score
    (a multiple of 5, larger than the count of rewarding steps), the training rewards +1.
    Catches the logged return taken from the clipped rewards."""
    env = make_env(atari_config("SpaceInvaders-v5"), seed=0, training=True, num_envs=1)
    rng = np.random.default_rng(1)
    rewarding, finished = 0, []
    try:
        env.reset()
        for _ in range(5000):
            step, done = env.step(rng.integers(0, env.num_actions, 1))
            assert step.reward[0] in (0.0, 1.0)
            rewarding += int(step.reward[0] > 0)
            if done:
                finished = done
                break
    finally:
        env.close()
    assert len(finished) == 1 and rewarding > 0
    score = finished[0].episode_return
    assert score % 5 == 0 and score >= 5 * rewarding and score > rewarding


def test_batch_rows_are_their_own_envs():
    """Row i of a 4-env batch is the game of seed + i played with action i: the same frames
    as that game alone. Catches rows out of env order (envpool answers as the games finish)
    and actions sent to the wrong env."""
    config = atari_config("Breakout-v5", num_envs=4)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 4, (40, 4))
    batch = make_env(config, seed=10, training=True)
    try:
        frames = [batch.reset().obs]
        frames += [batch.step(a)[0].obs for a in actions]
    finally:
        batch.close()
    for i in range(4):
        alone = make_env(config, seed=10 + i, training=True, num_envs=1)
        try:
            seen = [alone.reset().obs[0]]
            seen += [alone.step(actions[t, i : i + 1])[0].obs[0] for t in range(len(actions))]
        finally:
            alone.close()
        for t, frame in enumerate(seen):
            np.testing.assert_array_equal(frames[t][i], frame, err_msg=f"env {i}, step {t}")


class ShuffledEnvpool:
    """A fake envpool batch that answers every recv in a scrambled order, as envpool may.

    Env i's observation is filled with i; its reward is i + 1 (info's unclipped reward
    10 * (i + 1)); env 2's game ends (terminated, game over) on the second step."""

    class ActionSpace:
        n = 4

    action_space = ActionSpace()

    def __init__(self, **kwargs):
        self.num_envs = kwargs["num_envs"]
        self.steps = 0
        self.sent = None

    def reset(self):
        return np.zeros((self.num_envs, 4, 84, 84), np.uint8), {}

    def send(self, actions, env_ids):
        self.sent = dict(zip(env_ids.tolist(), actions.tolist(), strict=True))

    def recv(self):
        self.steps += 1
        order = np.array([2, 0, 3, 1])
        obs = np.stack([np.full((4, 84, 84), i, np.uint8) for i in order])
        over = (order == 2) & (self.steps == 2)
        info = {"env_id": order, "terminated": over, "reward": 10.0 * (order + 1)}
        return obs, (order + 1).astype(np.float32), over, np.zeros(4, bool), info

    def close(self):
        pass


def test_rows_are_put_back_in_env_order(monkeypatch):
    """envpool's answer in another order than its envs: every array is put back in env
    order, episodes are credited to the env that played them. Catches a recv that keeps
    envpool's order (or sorts only the observations), and an Episode with the row's
    position instead of the env's index."""
    import envpool

    monkeypatch.setattr(envpool, "make", lambda **kwargs: ShuffledEnvpool(**kwargs))
    env = envs.AtariEnv(atari_config("Breakout-v5", num_envs=4), seed=0)
    env.reset()
    env.send(np.array([3, 2, 1, 0]))
    assert env._env.sent == {0: 3, 1: 2, 2: 1, 3: 0}  # action i goes to env i
    step, finished = env.recv()
    assert [int(o[0, 0, 0]) for o in step.obs] == [0, 1, 2, 3]
    np.testing.assert_array_equal(step.reward, [1.0, 2.0, 3.0, 4.0])
    assert finished == []
    step, finished = env.step(np.zeros(4, np.int64))
    np.testing.assert_array_equal(step.terminated, [False, False, True, False])
    assert finished == [Episode(2, 60.0, 2)]  # env 2: 30 + 30 unclipped, two steps
    step, _ = env.step(np.zeros(4, np.int64))
    np.testing.assert_array_equal(step.first, [False, False, True, False])


def test_episode_tracker_sums_until_the_game_is_over():
    """Hand-worked: env 0 scores 1, 2, 3 and its game ends on the third step; env 1 ends on
    the first and starts again. Catches returns not reset after an episode, or kept per
    step rather than per env."""
    tracker = EpisodeTracker(2)
    assert tracker.update(np.array([1.0, 5.0]), np.array([False, True])) == [Episode(1, 5.0, 1)]
    assert tracker.update(np.array([2.0, 7.0]), np.array([False, False])) == []
    assert tracker.update(np.array([3.0, 1.0]), np.array([True, False])) == [Episode(0, 6.0, 3)]
    assert tracker.update(np.array([0.0, 1.0]), np.array([False, True])) == [Episode(1, 9.0, 3)]


def test_cartpole_rows_are_their_own_envs_and_the_step_after_the_end_starts_anew():
    """Two CartPole envs against two gymnasium CartPoles made here (seeds s and s + 1):
    the same observations until each falls; the step after an end returns the first
    observation of the next episode with reward 0 and FIRST set (envpool's autoreset).
    Catches envs out of order, an autoreset on the same step (the last observation lost),
    and an episode logged with another return than its length."""
    import gymnasium as gym

    config = dataclasses.replace(cartpole_defaults(), num_envs=2)
    env = make_env(config, seed=3)
    singles = [gym.make("CartPole-v1") for _ in range(2)]
    rng = np.random.default_rng(0)
    try:
        step = env.reset()
        for i, single in enumerate(singles):
            obs, _ = single.reset(seed=3 + i)
            np.testing.assert_allclose(step.obs[i], obs)
        lengths, ended, restarted = [0, 0], [False, False], [False, False]
        for _ in range(500):
            actions = rng.integers(0, 2, 2)
            step, finished = env.step(actions)
            for i, single in enumerate(singles):
                if restarted[i]:
                    continue
                if ended[i]:
                    # The step after the end: next episode's first observation, reward 0.
                    assert step.first[i] and step.reward[i] == 0.0
                    assert not step.terminated[i]
                    restarted[i] = True
                    continue
                obs, reward, terminated, truncated, _ = single.step(int(actions[i]))
                lengths[i] += 1
                np.testing.assert_allclose(step.obs[i], obs, rtol=1e-6)
                assert (step.reward[i], step.terminated[i]) == (reward, terminated)
                assert not step.first[i]
                if terminated or truncated:
                    ended[i] = True
                    assert Episode(i, float(lengths[i]), lengths[i]) in finished
            if all(restarted):
                break
        assert all(restarted)
    finally:
        env.close()
        for single in singles:
            single.close()
