"""Gorila DQN on gymnasium's CartPole-v1: the same flags as pong.py, for fast runs and tests.

python experiments/cartpole.py                   # a server and 2 bundles on 127.0.0.1
python experiments/cartpole.py --single-process  # one process
srun -n 3 python experiments/cartpole.py         # under SLURM
"""

import sys

from gorila_jax.core.config import cartpole_defaults
from gorila_jax.run.launch import main

if __name__ == "__main__":
    sys.exit(main(cartpole_defaults(), description=__doc__))
