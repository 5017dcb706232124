"""Tests for the replay memory: stacks, n-step returns, validity, priorities and memory."""

import types

import numpy as np
import pytest

import gorila_jax.core.replay as replay_module
from gorila_jax.core.replay import TERMINATED, TRUNCATED, PrioritizedReplay, Replay

ATARI_FRAME_BYTES = 84 * 84


class StreamLog:
    """What the actor fed into a replay, kept whole so tests can build reference answers."""

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        self.frames: list[np.ndarray] = []  # per time: (num_envs, 2) int32 = [env, time]
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.terminated: list[np.ndarray] = []
        self.truncated: list[np.ndarray] = []
        self.first: list[np.ndarray] = []

    def add(self, replay: Replay, actions, rewards, terminated, truncated, first) -> None:
        """Feed one vector step into the replay (frames encode env and time) and record it."""
        time = len(self.frames)
        frames = np.stack([np.arange(self.num_envs), np.full(self.num_envs, time)], axis=1)
        step = [np.asarray(x) for x in (frames, actions, rewards, terminated, truncated, first)]
        replay.add(*step)
        for store, value in zip(
            (self.frames, self.actions, self.rewards, self.terminated, self.truncated, self.first),
            step,
            strict=True,
        ):
            store.append(value)

    def is_last(self, env: int, time: int) -> bool:
        """Whether the observation is TERMINATED or TRUNCATED."""
        return bool(self.terminated[time][env] or self.truncated[time][env])

    def stack(self, env: int, time: int, stack_size: int) -> np.ndarray:
        """Reference stack: walk back to the episode start and pad with its first frame."""
        episode_start = time
        while not self.first[episode_start][env]:
            episode_start -= 1
        times = [max(time - stack_size + 1 + k, episode_start) for k in range(stack_size)]
        return np.stack([self.frames[t][env] for t in times])

    def transition(self, env: int, time: int, stack_size: int, n_step: int, gamma: float):
        """Reference n-step transition starting at (env, time), built with plain loops."""
        rewards, discounts = [], []
        end = time
        for i in range(1, n_step + 1):
            end = time + i
            rewards.append(self.rewards[end][env])
            discounts.append(0.0 if self.terminated[end][env] else gamma)
            if self.is_last(env, end):
                break
        rewards += [0.0] * (n_step - len(rewards))
        discounts += [1.0] * (n_step - len(discounts))
        return (
            self.stack(env, time, stack_size),
            self.actions[time][env],
            np.array(rewards, dtype=np.float32),
            np.array(discounts, dtype=np.float32),
            self.stack(env, end, stack_size),
        )

    def valid_starts(self, capacity_per_env: int, stack_size: int, n_step: int):
        """Reference set of valid (env, time) starts after everything added so far."""
        num_adds = len(self.frames)
        oldest = 0 if num_adds <= capacity_per_env else num_adds - capacity_per_env + stack_size - 1
        return {
            (env, time)
            for env in range(self.num_envs)
            for time in range(oldest, num_adds - n_step)
            if not self.is_last(env, time)
        }


def make_replay(kind=Replay, capacity=60, num_envs=3, stack_size=4, n_step=3, **kwargs):
    """Small replay storing [env, time] int32 frames."""
    args = dict(
        capacity=capacity,
        num_envs=num_envs,
        frame_shape=(2,),
        frame_dtype=np.int32,
        stack_size=stack_size,
        n_step=n_step,
        gamma=0.9,
        num_actions=5,
        seed=0,
    )
    args.update(kwargs)
    return kind(**args)


def feed_random_episodes(replay: Replay, log: StreamLog, num_steps: int, rng, after_add=None):
    """Feed episodes with random terminations and truncations (one obs after each end is FIRST)."""
    num_envs = replay.num_envs
    previous_last = np.ones(num_envs, dtype=bool)
    if log.frames:  # continue the episodes already in the log
        previous_last = log.terminated[-1] | log.truncated[-1]
    for _ in range(num_steps):
        first = previous_last
        draw = rng.random(num_envs)
        terminated = ~first & (draw < 0.12)
        truncated = ~first & (draw > 0.94)
        rewards = np.where(first, 0.0, rng.integers(-3, 4, size=num_envs)).astype(np.float32)
        actions = rng.integers(0, replay.num_actions, size=num_envs)
        log.add(replay, actions, rewards, terminated, truncated, first)
        previous_last = terminated | truncated
        if after_add is not None:
            after_add()


def env_and_time(replay: Replay, index: int, num_adds: int) -> tuple[int, int]:
    """Test-side decoding of a flat index into (env, newest time stored at that slot)."""
    env, slot = divmod(int(index), replay.capacity_per_env)
    time = slot
    while time + replay.capacity_per_env <= num_adds - 1:
        time += replay.capacity_per_env
    return env, time


def assert_matches_reference(replay: Replay, log: StreamLog, indices, transition) -> None:
    """Every transition in the batch equals the reference built from the log."""
    valid = log.valid_starts(replay.capacity_per_env, replay.stack_size, replay.n_step)
    for row, index in enumerate(indices):
        env, time = env_and_time(replay, index, len(log.frames))
        assert (env, time) in valid, f"sampled invalid start env={env} time={time}"
        obs_tm1, action, rewards, discounts, obs_t = log.transition(
            env, time, replay.stack_size, replay.n_step, replay.gamma
        )
        np.testing.assert_array_equal(transition.obs_tm1[row], obs_tm1)
        assert transition.action_tm1[row] == action
        np.testing.assert_array_equal(transition.rewards[row], rewards)
        np.testing.assert_allclose(transition.discounts[row], discounts, rtol=1e-7)
        np.testing.assert_array_equal(transition.obs_t[row], obs_t)


# ------------------------------------------------------------------------ hand-written cases


def feed_single_env(replay: Replay, events: dict[int, str], num_steps: int) -> None:
    """One env, frame value = time, reward = time + 0.25 (0 at FIRST), events mark last obs."""
    previous_last = True
    for time in range(num_steps):
        first = previous_last
        event = events.get(time)
        replay.add(
            frames=np.array([[time, time]], dtype=np.int32),
            actions=np.array([time % replay.num_actions]),
            rewards=np.array([0.0 if first else time + 0.25]),
            terminated=np.array([event in ("term", "both")]),
            truncated=np.array([event in ("trunc", "both")]),
            first=np.array([first]),
        )
        previous_last = event is not None


def frame_values(stack: np.ndarray) -> list[int]:
    """First component of every frame in one stack."""
    return [int(v) for v in stack[:, 0]]


def test_hand_built_stacks_and_n_step_with_termination_and_truncation():
    # Times: 0F 1 2 3T | 4F 5 6TR | 7F 8 9 10 ; stack 3, n_step 2, gamma 0.5
    replay = make_replay(num_envs=1, capacity=40, stack_size=3, n_step=2, gamma=0.5)
    feed_single_env(replay, {3: "term", 6: "trunc"}, num_steps=11)
    expected = {
        # start: (obs_tm1, rewards, discounts, obs_t)
        0: ([0, 0, 0], [1.25, 2.25], [0.5, 0.5], [0, 1, 2]),
        1: ([0, 0, 1], [2.25, 3.25], [0.5, 0.0], [1, 2, 3]),
        2: ([0, 1, 2], [3.25, 0.0], [0.0, 1.0], [1, 2, 3]),
        4: ([4, 4, 4], [5.25, 6.25], [0.5, 0.5], [4, 5, 6]),
        5: ([4, 4, 5], [6.25, 0.0], [0.5, 1.0], [4, 5, 6]),
        7: ([7, 7, 7], [8.25, 9.25], [0.5, 0.5], [7, 8, 9]),
        8: ([7, 7, 8], [9.25, 10.25], [0.5, 0.5], [8, 9, 10]),
    }
    assert len(replay) == len(expected)
    starts = np.array(sorted(expected))
    transition = replay.transitions_at(starts)
    assert transition.obs_tm1.shape == (len(starts), 3, 2)
    for row, start in enumerate(starts):
        obs_tm1, rewards, discounts, obs_t = expected[start]
        assert frame_values(transition.obs_tm1[row]) == obs_tm1
        assert transition.rewards[row].tolist() == rewards
        assert transition.discounts[row].tolist() == discounts
        assert frame_values(transition.obs_t[row]) == obs_t
        assert transition.action_tm1[row] == start % replay.num_actions
    for invalid_start in (3, 6, 9, 10):  # last obs, or lookahead not written yet
        with pytest.raises(ValueError, match="not valid"):
            replay.transitions_at(np.array([invalid_start]))
    replay.check_valid()


def test_hand_built_n_step_window_of_four():
    # Times: 0F 1 2T | 3F 4 5 6TR | 7F 8 9 10 11 12 ; stack 1, n_step 4, gamma 0.9
    replay = make_replay(num_envs=1, capacity=40, stack_size=1, n_step=4, gamma=0.9)
    feed_single_env(replay, {2: "term", 6: "trunc"}, num_steps=13)
    g = np.float32(0.9)
    expected = {
        0: ([1.25, 2.25, 0, 0], [g, 0, 1, 1], 2),
        1: ([2.25, 0, 0, 0], [0, 1, 1, 1], 2),
        3: ([4.25, 5.25, 6.25, 0], [g, g, g, 1], 6),
        5: ([6.25, 0, 0, 0], [g, 1, 1, 1], 6),
        7: ([8.25, 9.25, 10.25, 11.25], [g, g, g, g], 11),
        8: ([9.25, 10.25, 11.25, 12.25], [g, g, g, g], 12),
    }
    starts = np.array(sorted(expected))
    transition = replay.transitions_at(starts)
    assert transition.obs_t.shape == (len(starts), 1, 2)
    for row, start in enumerate(starts):
        rewards, discounts, obs_t_time = expected[start]
        np.testing.assert_array_equal(transition.rewards[row], np.float32(rewards))
        np.testing.assert_array_equal(transition.discounts[row], np.float32(discounts))
        assert frame_values(transition.obs_t[row]) == [obs_t_time]
    # Learner target with Q(obs_t) = 100: discounted sum plus bootstrap only if not terminated.
    q_next = 100.0
    row = int(np.flatnonzero(starts == 3)[0])
    cumulative = np.concatenate([[1.0], np.cumprod(transition.discounts[row])])
    target = (cumulative[:-1] * transition.rewards[row]).sum() + cumulative[-1] * q_next
    assert target == pytest.approx(4.25 + 0.9 * 5.25 + 0.81 * 6.25 + 0.729 * q_next, rel=1e-6)
    assert len(replay) == 7  # starts 0 1 3 4 5 7 8


def test_terminated_and_truncated_together_discount_zero():
    replay = make_replay(num_envs=1, capacity=40, stack_size=1, n_step=2, gamma=0.9)
    feed_single_env(replay, {2: "both"}, num_steps=6)
    transition = replay.transitions_at(np.array([1]))
    np.testing.assert_array_equal(transition.discounts[0], [0.0, 1.0])


# --------------------------------------------------------------- random streams with wrapping


@pytest.mark.parametrize("kind", [Replay, PrioritizedReplay])
def test_samples_match_reference_and_are_never_invalid_after_wrapping(kind):
    rng = np.random.default_rng(5)
    replay = make_replay(kind, capacity=3 * 17, num_envs=3, stack_size=4, n_step=3)
    log = StreamLog(replay.num_envs)

    def sample_and_check():
        replay.check_valid()
        expected_count = len(
            log.valid_starts(replay.capacity_per_env, replay.stack_size, replay.n_step)
        )
        assert len(replay) == expected_count
        if replay.can_sample(16):
            sample = replay.sample(16)
            assert_matches_reference(replay, log, sample.indices, sample.transition)
            assert sample.weights.dtype == np.float32
            replay.update_priorities(sample.indices, rng.normal(size=16) * 3)
        else:
            with pytest.raises(ValueError, match="valid transitions"):
                replay.sample(16)

    feed_random_episodes(replay, log, num_steps=150, rng=rng, after_add=sample_and_check)
    # Many more samples at the final state, including everything near the write head.
    batch_size = len(replay)
    for _ in range(50):
        sample = replay.sample(batch_size)
        assert_matches_reference(replay, log, sample.indices, sample.transition)
        replay.update_priorities(sample.indices, rng.normal(size=batch_size))
    replay.check_valid()


def test_every_valid_start_matches_reference_exhaustively():
    rng = np.random.default_rng(6)
    replay = make_replay(capacity=2 * 23, num_envs=2, stack_size=3, n_step=2)
    log = StreamLog(replay.num_envs)
    for _ in range(4):  # check before and after the ring wraps
        feed_random_episodes(replay, log, num_steps=19, rng=rng)
        valid = log.valid_starts(replay.capacity_per_env, replay.stack_size, replay.n_step)
        indices = np.array(
            [env * replay.capacity_per_env + time % replay.capacity_per_env for env, time in valid]
        )
        assert_matches_reference(replay, log, indices, replay.transitions_at(indices))
        everything = np.arange(replay.capacity)
        assert replay._is_valid_start(everything).sum() == len(valid)


def test_uniform_sampling_covers_valid_starts_evenly():
    rng = np.random.default_rng(7)
    replay = make_replay(capacity=2 * 30, num_envs=2, stack_size=2, n_step=1)
    log = StreamLog(replay.num_envs)
    feed_random_episodes(replay, log, num_steps=45, rng=rng)
    valid = np.sort(replay._all_valid_indices())
    counts = np.zeros(replay.capacity)
    for _ in range(100_000 // valid.size):
        counts += np.bincount(replay.sample(valid.size).indices, minlength=replay.capacity)
    expected = counts.sum() / valid.size
    chi_square = (((counts[valid] - expected) ** 2) / expected).sum()
    assert counts.sum() == counts[valid].sum()
    assert chi_square < valid.size - 1 + 6 * np.sqrt(2 * (valid.size - 1))


def test_abandoned_episode_is_marked_truncated():
    replay = make_replay(num_envs=1, capacity=40, stack_size=2, n_step=2)
    log = StreamLog(1)
    for time in range(8):
        log.add(replay, [0], [1.0], [False], [False], [time in (0, 4)])  # reset at 4, no end
    assert replay._flags[3] & TRUNCATED
    transition = replay.transitions_at(np.array([2]))
    assert transition.obs_t[0, :, 1].tolist() == [2, 3]  # stops at 3, not entering episode 2
    np.testing.assert_array_equal(transition.discounts[0], np.float32([0.9, 1.0]))
    replay.check_valid()


def test_frame_layouts_for_atari_and_vector_observations():
    atari = Replay(128, 2, (84, 84), np.uint8, 4, 3, 0.99, 18, seed=0)
    cartpole = Replay(64, 2, (4,), np.float32, 1, 3, 0.99, 2, seed=0)
    for step in range(20):
        first = np.full(2, step == 0)
        zeros = np.zeros(2)
        atari.add(np.full((2, 84, 84), step, np.uint8), [1, 2], zeros, zeros, zeros, first)
        cartpole.add(np.full((2, 4), step, np.float32), [0, 1], zeros, zeros, zeros, first)
    atari_batch = atari.sample(5).transition
    cartpole_batch = cartpole.sample(5).transition
    assert atari_batch.obs_tm1.shape == (5, 4, 84, 84) and atari_batch.obs_t.dtype == np.uint8
    assert cartpole_batch.obs_t.shape == (5, 1, 4) and cartpole_batch.obs_t.dtype == np.float32
    assert atari_batch.action_tm1.dtype == np.int32
    assert atari._actions.dtype == np.uint8


# --------------------------------------------------------------------------------- priorities


def filled_prioritized(
    alpha=0.6, beta_start=0.4, beta_end=1.0, beta_steps=4, epsilon=0.01, num_valid=30
):
    """One env, stack 1, n_step 1, a single long episode: `num_valid` valid starts."""
    replay = make_replay(
        PrioritizedReplay,
        num_envs=1,
        capacity=num_valid + 10,
        stack_size=1,
        n_step=1,
        alpha=alpha,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_steps=beta_steps,
        epsilon=epsilon,
    )
    feed_single_env(replay, {}, num_steps=num_valid + 1)
    return replay


def test_prioritized_frequencies_follow_td_error_power_alpha():
    num_valid = 400
    replay = filled_prioritized(alpha=0.7, num_valid=num_valid)
    indices = np.arange(num_valid)
    td_errors = np.random.default_rng(9).normal(size=num_valid) * 2
    replay.update_priorities(indices, td_errors)
    expected_probability = (np.abs(td_errors) + 0.01) ** 0.7
    expected_probability /= expected_probability.sum()
    counts = np.zeros(replay.capacity)
    for _ in range(200_000 // num_valid):
        counts += np.bincount(replay.sample(num_valid).indices, minlength=replay.capacity)
    assert counts[num_valid:].sum() == 0  # the newest slot is never a valid start
    expected = counts.sum() * expected_probability
    chi_square = (((counts[:num_valid] - expected) ** 2) / expected).sum()
    assert chi_square < num_valid - 1 + 6 * np.sqrt(2 * (num_valid - 1))
    # The same counts are far from what priorities without the alpha power would give.
    wrong = np.abs(td_errors) + 0.01
    wrong = counts.sum() * wrong / wrong.sum()
    assert (((counts[:num_valid] - wrong) ** 2) / wrong).sum() > 10 * num_valid


def test_importance_weights_and_beta_annealing():
    replay = filled_prioritized(alpha=0.5, beta_start=0.4, beta_end=1.0, beta_steps=4)
    td_errors = np.random.default_rng(8).normal(size=30)
    replay.update_priorities(np.arange(30), td_errors)
    priorities = (np.abs(td_errors) + 0.01) ** 0.5
    np.testing.assert_allclose(replay.priorities(np.arange(30)), priorities)
    probabilities = priorities / priorities.sum()
    count = len(replay)
    for expected_beta in (0.4, 0.55, 0.7, 0.85, 1.0, 1.0):
        assert replay.beta == pytest.approx(expected_beta)
        sample = replay.sample(30)
        all_weights = (count * probabilities) ** -expected_beta
        expected_weights = (count * probabilities[sample.indices]) ** -expected_beta
        expected_weights /= all_weights.max()
        assert sample.weights.dtype == np.float32
        np.testing.assert_allclose(sample.weights, expected_weights, rtol=1e-5)
        assert sample.weights.max() <= 1.0


def test_new_and_newly_valid_starts_get_the_max_priority():
    replay = filled_prioritized(alpha=1.0)
    replay.update_priorities(np.array([3, 4]), np.array([5.0, 0.5]))
    assert replay.priorities(np.array([3, 4])).tolist() == pytest.approx([5.01, 0.51])
    replay.add(np.array([[31, 31]]), [0], [1.0], [False], [False], [False])
    # Time 30 just became valid (its successor 31 exists) and gets the max priority ever stored.
    assert replay.priorities(np.array([30])).tolist() == pytest.approx([5.01])
    assert replay.priorities(np.array([31])).tolist() == [0.0]
    replay.check_valid()


def test_stale_priority_updates_are_ignored():
    replay = filled_prioritized()
    stale_index = np.array([0])
    for time in range(31, 41):  # the ring wraps, slot 0 leaves the valid window
        replay.add(np.array([[time, time]]), [0], [1.0], [False], [False], [False])
    replay.update_priorities(stale_index, np.array([100.0]))
    assert replay.priorities(stale_index).tolist() == [0.0]
    replay.check_valid()
    with pytest.raises(ValueError, match="non-finite"):
        replay.update_priorities(np.array([5]), np.array([np.nan]))


# ------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("prioritized", [False, True])
@pytest.mark.parametrize("capacity", [100_000, 1_000_000, 1_048_577])
def test_atari_bytes_per_transition_within_budget(prioritized, capacity):
    needed = Replay.bytes_needed(capacity, 8, (84, 84), np.uint8, prioritized, num_actions=18)
    assert needed / capacity <= 1.05 * ATARI_FRAME_BYTES


@pytest.mark.parametrize("kind", [Replay, PrioritizedReplay])
def test_bytes_needed_is_exact(kind):
    for num_actions in (18, 1000):
        replay = kind(1003, 4, (84, 84), np.uint8, 4, 3, 0.99, num_actions, seed=0)
        expected = Replay.bytes_needed(
            1003, 4, (84, 84), np.uint8, kind.prioritized, num_actions=num_actions
        )
        assert replay.nbytes == expected


@pytest.mark.parametrize("kind", [Replay, PrioritizedReplay])
def test_memory_error_is_raised_before_allocating(kind, monkeypatch):
    def refuse_allocation(*args, **kwargs):
        raise AssertionError("allocated before checking memory")

    monkeypatch.setattr(replay_module, "_allocate_zeros", refuse_allocation)
    monkeypatch.setattr(replay_module.SumTree, "__init__", refuse_allocation)
    monkeypatch.setattr(
        replay_module.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2e9)
    )
    with pytest.raises(
        MemoryError,
        match=r"^replay needs 7\.1 GB \(capacity=1000000 transitions of 7056-byte frames\) "
        r"but only 2\.0 GB is available; lower replay_capacity$",
    ):
        kind(1_000_000, 8, (84, 84), np.uint8, 4, 3, 0.99, 18, seed=0)


def test_impossible_capacity_raises_memory_error_with_message():
    with pytest.raises(MemoryError, match="lower replay_capacity"):
        Replay(10**13, 8, (84, 84), np.uint8, 4, 3, 0.99, 18, seed=0)


# -------------------------------------------------------------------------------- bad inputs


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        make_replay(capacity=3 * 7, num_envs=3, stack_size=4, n_step=3)
    with pytest.raises(ValueError, match="n_step"):
        make_replay(n_step=0)
    with pytest.raises(ValueError, match="epsilon"):
        make_replay(PrioritizedReplay, epsilon=0.0)
    replay = make_replay(num_envs=1, capacity=40, stack_size=1, n_step=1)
    with pytest.raises(ValueError, match="first add"):
        replay.add(np.zeros((1, 2)), [0], [0.0], [False], [False], [False])
    with pytest.raises(ValueError, match="actions"):
        replay.add(np.zeros((1, 2)), [5], [0.0], [False], [False], [True])
    with pytest.raises(ValueError, match="frames"):
        replay.add(np.zeros((2, 2)), [0], [0.0], [False], [False], [True])
    feed_single_env(replay, {}, num_steps=5)
    assert len(replay) == 4 and replay.can_sample(4) and not replay.can_sample(5)
    with pytest.raises(ValueError, match="batch of 5"):
        replay.sample(5)
    assert (replay._flags[:5] & TERMINATED).sum() == 0


def test_seed_sampling_replays_the_same_draws_and_keeps_the_memory():
    """Catches a reseed that also clears the memory, or that does not take: two reseeds
    with one seed sample the same indices; another seed samples others."""
    replay = Replay(capacity=64, num_envs=2, frame_shape=(3, 3), frame_dtype=np.uint8,
                    stack_size=2, n_step=1, gamma=0.9, num_actions=3, seed=0)  # fmt: skip
    for step in range(20):
        replay.add(
            np.full((2, 3, 3), step, np.uint8), np.zeros(2, np.int32),
            np.zeros(2, np.float32), np.zeros(2, bool), np.zeros(2, bool),
            np.full(2, step == 0),
        )  # fmt: skip
    stored = len(replay)
    replay.seed_sampling(7)
    first = replay.sample(8).indices.copy()
    replay.seed_sampling(7)
    np.testing.assert_array_equal(replay.sample(8).indices, first)
    replay.seed_sampling(8)
    assert not np.array_equal(replay.sample(8).indices, first)
    assert len(replay) == stored > 0
