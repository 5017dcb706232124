"""Which environments a run may name, and the shape facts that follow from the id alone.

The config validates `env_id` against these, and the replay sizes its frame stack from
them, without starting an environment: CartPole comes from gymnasium, the Atari games
from envpool's registry (the -v5 family, each observation a stack of 84x84 frames).
"""

from __future__ import annotations

import functools

CARTPOLE_IDS = ("CartPole-v1", "CartPole-v0")


def is_atari(env_id: str) -> bool:
    """Whether the id names an Atari game (run through envpool) rather than CartPole."""
    return env_id not in CARTPOLE_IDS


def stack_size(env_id: str) -> int:
    """Observations stacked per state: 4 Atari frames, 1 CartPole vector."""
    return ATARI_STACK if is_atari(env_id) else 1


ATARI_FRAME_SKIP = 4
ATARI_STACK = 4
ATARI_FRAME_SHAPE = (84, 84)


@functools.cache
def atari_env_ids() -> tuple[str, ...]:
    """Atari game ids that envpool provides (the -v5 family)."""
    import envpool

    return tuple(
        sorted(
            env_id
            for env_id in envpool.list_all_envs()
            if env_id.endswith("-v5") and "/" not in env_id and "-" not in env_id[:-3]
        )
    )
