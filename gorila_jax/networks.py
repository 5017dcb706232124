"""Q-networks (flax): the Nature DQN CNN for stacked Atari frames and an MLP for vectors.

Both map a batch of observations to one Q-value per action and can end in a dueling head
(Wang et al. 2016): Q = V + A - mean(A).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from gorila_jax.config import Config, is_atari


class QHead(nn.Module):
    """Linear Q-values, or a dueling value/advantage pair combined into Q-values."""

    num_actions: int
    dueling: bool = False
    hidden: int = 512

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        if not self.dueling:
            return nn.Dense(self.num_actions, name="q")(features)
        value = nn.Dense(1, name="value")(
            nn.relu(nn.Dense(self.hidden, name="value_hidden")(features))
        )
        advantage = nn.Dense(self.num_actions, name="advantage")(
            nn.relu(nn.Dense(self.hidden, name="advantage_hidden")(features))
        )
        return value + advantage - advantage.mean(axis=-1, keepdims=True)


class NatureCNN(nn.Module):
    """Mnih et al. (2015) network on uint8 frame stacks shaped (batch, 4, 84, 84).

    The input keeps envpool's channels-first layout; scaling to [0, 1] and the move to
    channels-last (the layout XLA's CPU convolutions prefer) happen inside the jitted graph.
    """

    num_actions: int
    dueling: bool = False

    @nn.compact
    def __call__(self, frames: jnp.ndarray) -> jnp.ndarray:
        x = jnp.transpose(frames, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        x = nn.relu(nn.Conv(32, (8, 8), strides=(4, 4), padding="VALID", name="conv1")(x))
        x = nn.relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="VALID", name="conv2")(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="VALID", name="conv3")(x))
        x = x.reshape((x.shape[0], -1))
        if self.dueling:
            return QHead(self.num_actions, dueling=True)(x)
        x = nn.relu(nn.Dense(512, name="fc")(x))
        return QHead(self.num_actions)(x)


class MLP(nn.Module):
    """Fully connected Q-network for vector observations (any trailing shape is flattened)."""

    num_actions: int
    hidden: Sequence[int] = (128, 128)
    dueling: bool = False

    @nn.compact
    def __call__(self, observations: jnp.ndarray) -> jnp.ndarray:
        x = observations.reshape((observations.shape[0], -1)).astype(jnp.float32)
        for index, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden{index}")(x))
        return QHead(self.num_actions, dueling=self.dueling, hidden=self.hidden[-1])(x)


def make_network(config: Config, num_actions: int) -> nn.Module:
    """The Q-network the config asks for: NatureCNN for Atari, MLP for CartPole."""
    if is_atari(config.env_id):
        return NatureCNN(num_actions=num_actions, dueling=config.dueling)
    return MLP(num_actions=num_actions, hidden=tuple(config.mlp_hidden), dueling=config.dueling)
