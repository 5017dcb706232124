"""`python -m gorila_jax.envs`: the valid environment ids, one per line (the listing the
config's one-line error about an unknown `--env-id` points to)."""

import sys

from gorila_jax.core.env_ids import CARTPOLE_IDS, atari_env_ids

sys.stdout.write("".join(f"{env_id}\n" for env_id in (*CARTPOLE_IDS, *atari_env_ids())))
