"""Acting: the epsilon schedule at chosen frames (worked out by hand) and the epsilon-greedy
policy against a Q-function whose argmax is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gorila_jax.core.actor import linear_epsilon, make_policy
from gorila_jax.core.config import Config


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (-100, 1.0),  # before the start: the start value
        (0, 1.0),
        (40_000, 0.905),  # 1 - 0.1 * 0.95
        (100_000, 0.7625),  # 1 - 0.25 * 0.95
        (200_000, 0.525),  # halfway
        (399_999, 0.05 + 0.95 / 400_000),
        (400_000, 0.05),
        (2_000_000, 0.05),  # flat after the decay
    ],
)
def test_epsilon_at_chosen_frames_of_the_atari_defaults(frame, expected):
    """Atari defaults: 1.0 to 0.05 over 400,000 frames. Catches a decay over another length
    (an off-by-one or a factor of frame skip), one that goes on below the end value or
    decays the wrong way round, and a fraction not clamped before frame 0, and a change
    of the defaults themselves (the README's table quotes them)."""
    config = Config()
    assert (config.epsilon_start, config.epsilon_end, config.epsilon_decay_frames) == (
        1.0, 0.05, 400_000,
    )  # fmt: skip
    got = linear_epsilon(
        frame,
        start=config.epsilon_start,
        end=config.epsilon_end,
        decay_frames=config.epsilon_decay_frames,
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_epsilon_can_rise_and_a_one_frame_decay_is_a_step():
    """Hand-worked: from 0.1 up to 0.5 over 10 frames is 0.3 at frame 5; a decay of one
    frame is at the end value from frame 1. Catches a schedule that assumes start > end
    (min/max of the two) or divides by decay_frames - 1."""
    assert linear_epsilon(5, start=0.1, end=0.5, decay_frames=10) == pytest.approx(0.3)
    assert linear_epsilon(0, start=1.0, end=0.2, decay_frames=1) == 1.0
    assert linear_epsilon(1, start=1.0, end=0.2, decay_frames=1) == pytest.approx(0.2)


class LinearQ:
    """A stand-in network: Q(obs) = obs @ params, so the greedy action is known in numpy."""

    @staticmethod
    def apply(params, obs):
        return obs @ params


NUM_ENVS, OBS, ACTIONS = 4096, 5, 6


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((OBS, ACTIONS)).astype(np.float32)
    obs = rng.standard_normal((NUM_ENVS, OBS)).astype(np.float32)
    greedy = np.argmax(obs @ weights, axis=1)
    return jnp.asarray(weights), jnp.asarray(obs), greedy


def test_epsilon_zero_is_greedy_for_every_env_and_key():
    """Catches a policy that explores at epsilon 0 (uniform <= epsilon, or a fixed floor),
    takes the argmin, or mixes the envs' Q-values up (argmax over the wrong axis)."""
    policy = make_policy(LinearQ())
    weights, obs, greedy = inputs()
    key = jax.random.key(0)
    for _ in range(3):
        actions, key = policy(weights, obs, key, 0.0)
        assert actions.dtype == jnp.int32 and actions.shape == (NUM_ENVS,)
        np.testing.assert_array_equal(np.asarray(actions), greedy)


def test_epsilon_explores_that_share_of_envs_uniformly():
    """At epsilon 0.3, an env acts at random with probability 0.3 and then picks its
    greedy action 1 time in 6 by chance: 0.3 * 5/6 = 25% of 4,096 actions differ from the
    greedy ones (binomial sd 0.7%). At epsilon 1 every action is uniform: each of the 6
    near 1/6. Catches epsilon used the wrong way round (70% random), one random draw
    shared by all envs, and random actions that leave out an action (randint's high
    bound off by one)."""
    policy = make_policy(LinearQ())
    weights, obs, greedy = inputs(1)
    actions, _ = policy(weights, obs, jax.random.key(1), 0.3)
    off_greedy = np.mean(np.asarray(actions) != greedy)
    assert off_greedy == pytest.approx(0.3 * 5 / 6, abs=0.03)
    actions, _ = policy(weights, obs, jax.random.key(2), 1.0)
    counts = np.bincount(np.asarray(actions), minlength=ACTIONS)
    assert len(counts) == ACTIONS
    np.testing.assert_allclose(counts / NUM_ENVS, 1 / ACTIONS, atol=0.03)


def test_the_key_advances_and_fixes_the_actions():
    """Catches a policy that returns its input key (every step would explore the same
    way) and one whose actions do not follow from the key alone."""
    policy = make_policy(LinearQ())
    weights, obs, _ = inputs(2)
    key = jax.random.key(5)
    first, next_key = policy(weights, obs, key, 0.5)
    again, same_next = policy(weights, obs, key, 0.5)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert np.array_equal(jax.random.key_data(next_key), jax.random.key_data(same_next))
    assert not np.array_equal(jax.random.key_data(next_key), jax.random.key_data(key))
    later, _ = policy(weights, obs, next_key, 0.5)
    assert not np.array_equal(np.asarray(first), np.asarray(later))
