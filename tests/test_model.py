"""The run's model: one network, params template and parameter count for every role."""

import dataclasses

import chex
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from gorila_jax.core.config import Config, cartpole_defaults
from gorila_jax.core.model import Model
from gorila_jax.core.networks import MLP, NatureCNN
from gorila_jax.envs import make_env, model_of


def test_params_depend_on_the_seed_not_on_the_observation_batch():
    """Catches roles whose params differ because one probed a one-env instance and another
    initialised from its full observation batch (the server's initial params must be what
    a single process starts from), or a template that ignores the seed."""
    config = cartpole_defaults()
    model = model_of(config)
    assert isinstance(model.network, MLP) and model.num_actions == 2
    env = make_env(config, seed=5, training=True)
    try:
        batch = Model.from_env(config, env)
        assert batch.example_obs.shape[0] == config.num_envs > model.example_obs.shape[0] == 1
        chex.assert_trees_all_equal(batch.init(3), model.init(3))
    finally:
        env.close()
    different = jax.tree.leaves(model.init(4))
    first = jax.tree.leaves(model.init(3))
    assert not all(np.array_equal(a, b) for a, b in zip(first, different, strict=True))
    flat, _ = ravel_pytree(model.init(3))
    assert model.num_params == flat.size == 4 * 128 + 128 + 128 * 128 + 128 + 128 * 2 + 2


def test_the_pong_model_is_the_nature_cnn_of_its_action_count():
    """Catches a probe that builds the wrong network or counts the wrong parameters for
    Atari (the server's shard layout and message limit come from this count)."""
    model = model_of(dataclasses.replace(Config(), env_id="Pong-v5"))
    assert isinstance(model.network, NatureCNN) and model.num_actions == 6
    assert model.example_obs.shape == (1, 4, 84, 84)
    # conv 8x8x4->32, 4x4x32->64, 3x3x64->64, dense 3136->512, 512->6 (weights + biases)
    expected = (8 * 8 * 4 * 32 + 32) + (4 * 4 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64)
    expected += (3136 * 512 + 512) + (512 * 6 + 6)
    assert model.num_params == expected == 1_687_206


def test_the_compiled_init_is_the_networks_own_and_zeros_is_its_template():
    """`Model.init` compiles the initialisers without LLVM's optimisations: its params are
    flax's op-by-op `network.init` to the last bit or two (catches a changed key, network
    or initialiser: those move params by whole units of their scale). `zeros` has init's
    tree, shapes, dtypes and wire fingerprint, and holds zeros only."""
    from gorila_jax.wire.transport import tree_fingerprint

    for config in (cartpole_defaults(), Config()):
        model = model_of(config)
        compiled = model.init(7)
        by_op = model.network.init(jax.random.key(7), model.example_obs)
        chex.assert_trees_all_close(compiled, by_op, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_equal(model.init(7), compiled)  # the same on every call
        zeros = model.zeros()
        chex.assert_trees_all_equal_shapes_and_dtypes(zeros, compiled)
        assert all(
            isinstance(leaf, np.ndarray) and not leaf.any() for leaf in jax.tree.leaves(zeros)
        )
        assert tree_fingerprint(zeros) == tree_fingerprint(compiled)
