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

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from gorila_jax.core.config import Config
from gorila_jax.core.networks import make_network

# Params are initialised once per process, so their initialisers are compiled as one
# computation without LLVM's optimisations: about 2 s for the Nature CNN here, against
# about 10 s optimised and 17 s op by op (each op compiled on its own, what `network.init`
# does outside jit; three of them on one core took a SLURM Pong job a minute to start).
# The values are those of the op-by-op init to the last bit or two (float contractions).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


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
        obs = self.example_obs
        return _compiled_init(self.network, obs.shape, obs.dtype)(jax.random.key(seed), obs)

    def zeros(self) -> Any:
        """A params tree of zeros (numpy): the template of the flat vector, of a params file
        or of the wire's fingerprint, for a role that is sent its params rather than
        making them (a bundle, an aggregator, `evaluate.py`). No computation, no compile."""
        return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), self.shapes())

    def shapes(self) -> Any:
        """The params' shapes and dtypes (`jax.ShapeDtypeStruct` leaves), traced
        abstractly: starts no XLA backend, so a process may ask before it leaves
        jax.distributed."""
        return jax.eval_shape(lambda: self.network.init(jax.random.key(0), self.example_obs))

    @property
    def num_params(self) -> int:
        """The number of parameters (all leaves' elements)."""
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(self.shapes()))


@functools.lru_cache(maxsize=8)
def _compiled_init(network: Any, obs_shape: tuple[int, ...], obs_dtype: np.dtype):
    """`network.init` compiled once per network and observation shape (a process that
    initialises twice compiles once), with `INIT_COMPILER_OPTIONS`."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    obs = jax.ShapeDtypeStruct(obs_shape, obs_dtype)
    return jax.jit(network.init).lower(key, obs).compile(compiler_options=INIT_COMPILER_OPTIONS)
