"""Q-networks (flax): the Nature DQN CNN for stacked Atari frames and an MLP for vectors.

Both map a batch of observations to one Q-value per action and can end in a dueling head
(Wang et al. 2016): Q = V + A - mean(A).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from gorila_jax.core.config import Config
from gorila_jax.core.env_ids import is_atari


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


def space_to_depth(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B, H/block, W/block, block*block*C), channels ordered (row, col, c)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // block, w // block, block * block * c)


def shifted_matmul_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Stride-1 VALID convolution as ONE matmul followed by shifted adds.

    x (B, H, W, C), kernel (k, k, C, O). Every input pixel is multiplied by all k*k kernel
    taps at once, (B*H*W, C) @ (C, k*k*O), and output pixel (i, j) sums tap (di, dj) of
    input pixel (i+di, j+dj). On CPU this runs near matmul speed where XLA's native
    convolution of the strided Nature layers does not (see benchmarks/learner_step.py).
    """
    n, h, w, c = x.shape
    k, out = kernel.shape[0], kernel.shape[-1]
    taps = kernel.transpose(2, 0, 1, 3).reshape(c, k * k * out)
    y = (x.reshape(n * h * w, c) @ taps).reshape(n, h, w, k, k, out)
    h_out, w_out = h - k + 1, w - k + 1
    total = y[:, 0:h_out, 0:w_out, 0, 0]
    for di in range(k):
        for dj in range(k):
            if di or dj:
                total = total + y[:, di : di + h_out, dj : dj + w_out, di, dj]
    return total


class StridedConv(nn.Module):
    """A VALID convolution with stride == kernel/2, computed by space-to-depth + matmul.

    Its params are those of `nn.Conv` (kernel (k, k, C, O) in HWIO, bias (O,)), so
    checkpoints and the parameter server see the usual Nature DQN layout. The input is
    expected already rearranged by `space_to_depth(x, stride)`.
    """

    features: int
    kernel_size: int
    stride: int
    in_features: int

    @nn.compact
    def __call__(self, blocks: jnp.ndarray) -> jnp.ndarray:
        k, s = self.kernel_size, self.stride
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, self.in_features, self.features),
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        taps = k // s
        # (k, k, C, O) -> (k/s, k/s, s*s*C, O), matching space_to_depth's channel order.
        kernel = kernel.reshape(taps, s, taps, s, self.in_features, self.features)
        kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(
            taps, taps, s * s * self.in_features, self.features
        )
        return shifted_matmul_conv(blocks, kernel) + bias


def nature_head(features: jnp.ndarray, num_actions: int, dueling: bool) -> jnp.ndarray:
    """The Nature network after its convolutions: a 512-unit layer and the Q-values (or the
    dueling streams). Called inside a compact `__call__`, so its layers belong to the caller."""
    x = features.reshape((features.shape[0], -1))
    if dueling:
        return QHead(num_actions, dueling=True)(x)
    x = nn.relu(nn.Dense(512, name="fc")(x))
    return QHead(num_actions)(x)


class NatureCNN(nn.Module):
    """Mnih et al. (2015) network on uint8 frame stacks shaped (batch, 4, 84, 84).

    The input keeps envpool's channels-first layout. The move to channels-last and the
    first space-to-depth are one uint8 transpose; scaling to [0, 1] follows. The two strided
    layers run as space-to-depth + matmul (`StridedConv`), the third as XLA's convolution:
    each is the faster way for its layer on CPU, with identical parameters and results.
    """

    num_actions: int
    dueling: bool = False

    @nn.compact
    def __call__(self, frames: jnp.ndarray) -> jnp.ndarray:
        n, stack, height, width = frames.shape
        # (B, C, H, W) -> (B, H/4, W/4, 4*4*C) with channels ordered (row, col, c).
        x = frames.reshape(n, stack, height // 4, 4, width // 4, 4).transpose(0, 2, 4, 3, 5, 1)
        x = x.reshape(n, height // 4, width // 4, 16 * stack).astype(jnp.float32) / 255.0
        x = nn.relu(StridedConv(32, 8, 4, stack, name="conv1")(x))
        x = nn.relu(StridedConv(64, 4, 2, 32, name="conv2")(space_to_depth(x, 2)))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="VALID", name="conv3")(x))
        return nature_head(x, self.num_actions, self.dueling)


class NatureCNNReference(nn.Module):
    """The same network with XLA's native convolutions: the reference for tests and FLOPs.

    Same parameter tree as `NatureCNN`; slower on CPU, kept to check `NatureCNN` against and
    to count the step's FLOPs without the shifted-matmul layers' extra work.
    """

    num_actions: int
    dueling: bool = False

    @nn.compact
    def __call__(self, frames: jnp.ndarray) -> jnp.ndarray:
        x = jnp.transpose(frames, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        x = nn.relu(nn.Conv(32, (8, 8), strides=(4, 4), padding="VALID", name="conv1")(x))
        x = nn.relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="VALID", name="conv2")(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="VALID", name="conv3")(x))
        return nature_head(x, self.num_actions, self.dueling)


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
