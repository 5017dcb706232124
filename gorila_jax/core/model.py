"""The model of a run: its Q-network, a params template and the parameter count, from one
observation of the run's environment.

Every role needs the same three things before it can do anything else: the network the
config names (`networks.make_network`), a params tree to give the flat parameter vector
its shape (ravel order, the wire's tree fingerprint, the template a checkpoint or a params
file is read into) and the number of parameters (the server's shard layout, the message
size limit). They depend on the config and on the environment's action count and
observation shape only, so `Model.from_env` makes them from an environment a role already
has, and `gorila_jax.envs.model_of(config)` from a one-env instance it closes at once.
The parameter server's shards, the bundles, the single process and `evaluate.py` all use
it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from gorila_jax.core.config import Config
from gorila_jax.core.networks import make_network


class Model(NamedTuple):
    """A run's Q-network and what its params look like."""

    network: Any  # a flax module
    num_actions: int
    example_obs: np.ndarray  # one batch of observations, for `network.init`

    @classmethod
    def from_env(cls, config: Config, env) -> Model:
        """The model of `config` for `env` (reset here for its first observation)."""
        return cls(make_network(config, env.num_actions), env.num_actions, env.reset().obs)

    def init(self, seed: int) -> Any:
        """Freshly initialised params: the same for a seed whatever the observation batch
        (they depend on the key and the shapes only)."""
        return self.network.init(jax.random.key(seed), self.example_obs)

    def shapes(self) -> Any:
        """The params' shapes and dtypes (`jax.ShapeDtypeStruct` leaves), traced
        abstractly: starts no XLA backend, so a process may ask before it leaves
        jax.distributed."""
        return jax.eval_shape(lambda: self.network.init(jax.random.key(0), self.example_obs))

    @property
    def num_params(self) -> int:
        """The number of parameters (all leaves' elements)."""
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(self.shapes()))
