"""Gorila DQN on Atari Pong (any envpool Atari game through --env-id).

    srun -n 4 python experiments/pong.py ...      # SLURM: process 0 is the server, others bundles
    python experiments/pong.py ...                # local: a server and --workers bundles
    python experiments/pong.py --single-process   # one process, no parameter server

Every flag is listed by --help; --config FILE.yaml sets a base that flags override.
"""

import sys

from gorila_jax.core.config import Config
from gorila_jax.run.launch import main

if __name__ == "__main__":
    sys.exit(main(Config(), description=__doc__))
