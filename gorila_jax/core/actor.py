"""Acting: a jitted epsilon-greedy policy over the env batch and the epsilon schedule."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def linear_epsilon(frame: int, *, start: float, end: float, decay_frames: int) -> float:
    """Epsilon at `frame`: linear from `start` to `end` over `decay_frames`, then flat."""
    fraction = min(max(frame, 0) / decay_frames, 1.0)
    return start + fraction * (end - start)


def make_policy(network: nn.Module) -> Callable:
    """Jitted policy(params, obs, key, epsilon) -> (actions int32 (num_envs,), next key).

    Each env explores independently: with probability epsilon a uniform random action,
    otherwise the greedy one. The key is split inside and the next key returned.
    """

    def policy(params, obs, key, epsilon):
        key, explore_key, action_key = jax.random.split(key, 3)
        q_values = network.apply(params, obs)
        greedy = jnp.argmax(q_values, axis=-1).astype(jnp.int32)
        num_envs, num_actions = q_values.shape
        random_actions = jax.random.randint(action_key, (num_envs,), 0, num_actions, jnp.int32)
        explore = jax.random.uniform(explore_key, (num_envs,)) < epsilon
        return jnp.where(explore, random_actions, greedy), key

    return jax.jit(policy)
