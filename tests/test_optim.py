"""Tests for gorila_jax.core.optim: DC-ASGD against a numpy reference, and the optimizer factory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gorila_jax.core.optim import OPTIMIZER_NAMES, DcAsgdState, dc_asgd, make_optimizer

LEAF_SHAPES = {"w": (3, 4), "b": (4,), "scale": ()}
NUM_STEPS = 4


def random_tree(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        name: (scale * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in LEAF_SHAPES.items()
    }


def random_steps(seed: int, num_steps: int = NUM_STEPS):
    """Yields (grads, params, stale_params) numpy trees, different at every step."""
    rng = np.random.default_rng(seed)
    for _ in range(num_steps):
        params = random_tree(rng)
        # Stale params near the current ones, as after a few server updates.
        stale = {k: v + random_tree(rng, 0.3)[k] for k, v in params.items()}
        yield random_tree(rng), params, stale


def to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


class NumpyDcAsgd:
    """Float64 reference of DC-ASGD that keeps its own running mean square."""

    def __init__(self, lambda_: float, adaptive: bool, momentum: float, eps: float):
        self.lambda_, self.adaptive, self.momentum, self.eps = lambda_, adaptive, momentum, eps
        self.mean_square = {k: np.zeros(s) for k, s in LEAF_SHAPES.items()}

    def __call__(self, grads, params, stale):
        out = {}
        for k in grads:
            g = grads[k].astype(np.float64)
            delay = params[k].astype(np.float64) - stale[k].astype(np.float64)
            if self.adaptive:
                self.mean_square[k] = (
                    self.momentum * self.mean_square[k] + (1 - self.momentum) * g * g
                )
                lam = self.lambda_ / np.sqrt(self.mean_square[k] + self.eps)
            else:
                lam = self.lambda_
            out[k] = g + lam * g * g * delay
        return out


class NumpyAdam:
    """Float64 reference of Adam (optax conventions: eps outside the sqrt, eps_root=0)."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.mu = {k: np.zeros(s) for k, s in LEAF_SHAPES.items()}
        self.nu = {k: np.zeros(s) for k, s in LEAF_SHAPES.items()}
        self.count = 0

    def __call__(self, grads):
        self.count += 1
        out = {}
        for k, g in grads.items():
            self.mu[k] = self.b1 * self.mu[k] + (1 - self.b1) * g
            self.nu[k] = self.b2 * self.nu[k] + (1 - self.b2) * g * g
            mu_hat = self.mu[k] / (1 - self.b1**self.count)
            nu_hat = self.nu[k] / (1 - self.b2**self.count)
            out[k] = -self.lr * mu_hat / (np.sqrt(nu_hat) + self.eps)
        return out


DC_FORMS = [
    pytest.param(dict(lambda_=0.5, adaptive=False), id="constant"),
    pytest.param(dict(lambda_=2.0, adaptive=True, momentum=0.9, eps=1e-3), id="adaptive"),
]


@pytest.mark.parametrize("form", DC_FORMS)
def test_dc_asgd_matches_numpy_reference_over_several_steps(form):
    transform = dc_asgd(**form)
    reference = NumpyDcAsgd(
        form["lambda_"], form["adaptive"], form.get("momentum", 0.95), form.get("eps", 1e-7)
    )
    update = jax.jit(lambda g, s, p, st: transform.update(g, s, p, stale_params=st))
    state = transform.init(to_jax(random_tree(np.random.default_rng(99))))

    for grads, params, stale in random_steps(seed=1):
        compensated, state = update(to_jax(grads), state, to_jax(params), to_jax(stale))
        expected = reference(grads, params, stale)
        # The correction must be a sizeable part of the result, or the check would be vacuous.
        assert max(np.max(np.abs(expected[k] - grads[k])) for k in grads) > 0.1
        chex.assert_trees_all_close(compensated, expected, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_equal_dtypes(compensated, to_jax(grads))

    if form["adaptive"]:
        chex.assert_trees_all_close(state.mean_square, reference.mean_square, rtol=1e-5)


def test_constant_form_state_is_an_empty_placeholder():
    params = to_jax(random_tree(np.random.default_rng(0)))
    state = dc_asgd(0.1).init(params)
    assert isinstance(state, DcAsgdState)
    assert jax.tree.leaves(state) == []

    adaptive_state = dc_asgd(2.0, adaptive=True).init(params)
    chex.assert_trees_all_equal(adaptive_state.mean_square, jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("form", DC_FORMS)
@pytest.mark.parametrize("base_name", ["sgd", "adam"])
def test_zero_delay_equals_the_optimizer_alone(form, base_name):
    def base():
        return optax.sgd(0.1) if base_name == "sgd" else optax.adam(0.01)

    compensated_opt = optax.chain(dc_asgd(**form), base())
    plain_opt = base()

    def run_both(grads_seq, params_seq):
        compensated_state = compensated_opt.init(params_seq[0])
        plain_state = plain_opt.init(params_seq[0])
        outputs = []
        for grads, params in zip(grads_seq, params_seq, strict=True):
            compensated, compensated_state = compensated_opt.update(
                grads, compensated_state, params, stale_params=params
            )
            plain, plain_state = plain_opt.update(grads, plain_state, params)
            outputs.append((compensated, plain))
        return outputs

    steps = list(random_steps(seed=2))
    grads_seq = [to_jax(grads) for grads, _, _ in steps]
    params_seq = [to_jax(params) for _, params, _ in steps]
    # Op by op, a zero delay adds an exact zero, so the outputs are bit-identical.
    for compensated, plain in run_both(grads_seq, params_seq):
        chex.assert_trees_all_equal(compensated, plain)
    # Compiled, XLA may fuse the two graphs differently (seen with adam after the first step),
    # so only agreement to float32 rounding is guaranteed.
    for compensated, plain in jax.jit(run_both)(grads_seq, params_seq):
        chex.assert_trees_all_close(compensated, plain, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("form", DC_FORMS)
def test_chained_with_adam_matches_numpy_adam_on_compensated_gradient(form):
    learning_rate = 0.01
    opt = optax.chain(dc_asgd(**form), optax.adam(learning_rate))
    reference_dc = NumpyDcAsgd(
        form["lambda_"], form["adaptive"], form.get("momentum", 0.95), form.get("eps", 1e-7)
    )
    reference_adam = NumpyAdam(learning_rate)
    update = jax.jit(lambda g, s, p, st: opt.update(g, s, p, stale_params=st))
    state = opt.init(to_jax(random_tree(np.random.default_rng(5))))

    for grads, params, stale in random_steps(seed=3, num_steps=5):
        updates, state = update(to_jax(grads), state, to_jax(params), to_jax(stale))
        expected = reference_adam(reference_dc(grads, params, stale))
        chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-7)


def test_no_recompilation_on_later_calls():
    trace_count = 0
    transform = dc_asgd(2.0, adaptive=True)

    @jax.jit
    def update(grads, state, params, stale):
        nonlocal trace_count
        trace_count += 1
        return transform.update(grads, state, params, stale_params=stale)

    state = transform.init(to_jax(random_tree(np.random.default_rng(0))))
    for grads, params, stale in random_steps(seed=4):
        _, state = update(to_jax(grads), state, to_jax(params), to_jax(stale))
    assert trace_count == 1


def test_missing_params_or_stale_params_raise():
    tree = to_jax(random_tree(np.random.default_rng(0)))
    for adaptive in (False, True):
        transform = dc_asgd(0.1, adaptive=adaptive)
        state = transform.init(tree)
        with pytest.raises(ValueError, match="`params`"):
            transform.update(tree, state, stale_params=tree)
        with pytest.raises(ValueError, match="stale_params"):
            transform.update(tree, state, tree)
        # Through a chain, the same errors surface.
        chained = optax.chain(transform, optax.sgd(0.1))
        with pytest.raises(ValueError, match="stale_params"):
            chained.update(tree, chained.init(tree), tree)


def test_unknown_extra_keywords_are_ignored():
    grads, params, stale = map(to_jax, next(random_steps(seed=6)))
    transform = dc_asgd(0.3)
    state = transform.init(params)
    expected, _ = transform.update(grads, state, params, stale_params=stale)
    got, _ = transform.update(grads, state, params, stale_params=stale, value=1.0, step=3)
    chex.assert_trees_all_equal(got, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lambda_=-0.1), "lambda_ must be >= 0"),
        (dict(lambda_=float("nan")), "lambda_ must be >= 0"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(eps=0.0), "eps must be > 0"),
    ],
)
def test_bad_constructor_args_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dc_asgd(**kwargs)


def test_lambda_zero_is_the_identity():
    grads, params, stale = map(to_jax, next(random_steps(seed=7)))
    transform = dc_asgd(0.0)
    got, _ = transform.update(grads, transform.init(params), params, stale_params=stale)
    chex.assert_trees_all_equal(got, grads)


DC_CONFIGS = [
    pytest.param(dict(), id="no-dc"),
    pytest.param(dict(dc_asgd_lambda=0.5), id="dc-constant"),
    pytest.param(dict(dc_asgd_lambda=2.0, dc_asgd_adaptive=True), id="dc-adaptive"),
]


@pytest.mark.parametrize("dc_config", DC_CONFIGS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_make_optimizer_every_name_updates_with_one_signature(name, dc_config):
    opt = make_optimizer(name, 1e-3, eps=1e-6, max_grad_norm=10.0, **dc_config)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    grads, params, stale = map(to_jax, next(random_steps(seed=8)))

    @jax.jit
    def step(grads, state, params, stale):
        updates, state = opt.update(grads, state, params=params, stale_params=stale)
        return optax.apply_updates(params, updates), state

    new_params, _ = step(grads, opt.init(params), params, stale)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    chex.assert_tree_all_finite(new_params)
    assert any(not np.array_equal(new_params[k], params[k]) for k in params)


def test_make_optimizer_without_dc_ignores_stale_params():
    grads, params, stale = map(to_jax, next(random_steps(seed=9)))
    opt = make_optimizer("sgd", 0.1, eps=1e-6)
    state = opt.init(params)
    with_stale, _ = opt.update(grads, state, params=params, stale_params=stale)
    without_stale, _ = opt.update(grads, state, params=params)
    chex.assert_trees_all_equal(with_stale, without_stale)


def test_make_optimizer_clips_before_compensating():
    grads, params, stale = next(random_steps(seed=10))
    learning_rate, max_norm, lambda_ = 0.1, 0.5, 0.7
    opt = make_optimizer(
        "sgd", learning_rate, eps=1e-6, dc_asgd_lambda=lambda_, max_grad_norm=max_norm
    )
    updates, _ = opt.update(
        to_jax(grads), opt.init(to_jax(params)), params=to_jax(params), stale_params=to_jax(stale)
    )

    global_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    assert global_norm > max_norm
    clipped = {k: g * (max_norm / global_norm) for k, g in grads.items()}
    compensated = NumpyDcAsgd(lambda_, False, 0.95, 1e-7)(clipped, params, stale)
    expected = {k: -learning_rate * v for k, v in compensated.items()}
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_make_optimizer_rmsprop_is_dqn_style():
    grads, params, _ = next(random_steps(seed=11))
    learning_rate, eps = 0.01, 0.01
    opt = make_optimizer("rmsprop", learning_rate, eps=eps)
    updates, _ = opt.update(to_jax(grads), opt.init(to_jax(params)), params=to_jax(params))
    # One step from a zero accumulator: nu = (1 - 0.95) g^2, update = -lr g / sqrt(nu + eps).
    expected = {
        k: -learning_rate * g / np.sqrt((1 - 0.95) * g.astype(np.float64) ** 2 + eps)
        for k, g in grads.items()
    }
    chex.assert_trees_all_close(updates, expected, rtol=1e-5)


def test_make_optimizer_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'") as error:
        make_optimizer("lamb", 1e-3, eps=1e-6)
    for name in OPTIMIZER_NAMES:
        assert name in str(error.value)


def test_make_optimizer_rejects_bad_numbers():
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer("adam", 0.0, eps=1e-6)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_optimizer("adam", 1e-3, eps=1e-6, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="lambda_"):
        make_optimizer("adam", 1e-3, eps=1e-6, dc_asgd_lambda=-1.0)


def reference_learning_rate(count: int, start_lr: float, end_lr: float, start: int, over: int):
    """By hand: the full rate for `start` updates, then a straight line to `end_lr` over
    `over` updates, then `end_lr`."""
    progress = min(max(count - start, 0) / over, 1.0)
    return start_lr + (end_lr - start_lr) * progress


def test_the_learning_rate_decays_linearly_by_update_count():
    """SGD through the factory with a decay from update 2 over 4 updates: each update is
    -lr(count) * grad with lr by hand, constant before, a straight line during and the end
    value after. Catches a decay keyed on anything but the optimizer's own count, one that
    starts or ends an update off, and end and start swapped."""
    learning_rate, end = 0.1, 0.025
    opt = make_optimizer(
        "sgd", learning_rate, eps=1e-6, learning_rate_end=end, decay_start=2, decay_updates=4
    )
    steps = list(random_steps(seed=12, num_steps=9))
    state = opt.init(to_jax(steps[0][1]))
    for count, (grads, params, _) in enumerate(steps):
        updates, state = opt.update(to_jax(grads), state, params=to_jax(params))
        lr = reference_learning_rate(count, learning_rate, end, 2, 4)
        expected = {k: -lr * g for k, g in grads.items()}
        chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-8)
    # The last update, past the decay, at the end rate itself.
    chex.assert_trees_all_close(updates, {k: -end * g for k, g in steps[-1][0].items()}, rtol=1e-6)


def test_the_config_optimizer_applies_the_configured_decay():
    """The one factory the server and the processes use reads the three decay fields: Adam's
    first update is lr(0) * sign(g) (its first step is the sign of the gradient), and after
    a decay of 3 updates from update 0 the fifth is still Adam's update at the end rate."""
    import dataclasses

    from gorila_jax.core.config import cartpole_defaults
    from gorila_jax.core.optim import config_optimizer

    config = dataclasses.replace(
        cartpole_defaults(), learning_rate=1e-2, learning_rate_end=1e-3,
        learning_rate_decay_start=0, learning_rate_decay_updates=3, max_grad_norm=0.0,
    )  # fmt: skip
    opt = config_optimizer(config, server=False)
    same_grads = random_tree(np.random.default_rng(13))
    params = to_jax(random_tree(np.random.default_rng(14)))
    state = opt.init(params)
    seen = []
    for _ in range(5):
        updates, state = opt.update(to_jax(same_grads), state, params=params)
        seen.append(updates)
    # The same gradient every time: Adam's normalised step is sign(g) (up to eps), so each
    # update is -lr(count) * sign(g).
    for count, updates in enumerate(seen):
        lr = reference_learning_rate(count, 1e-2, 1e-3, 0, 3)
        expected = {k: -lr * np.sign(g) for k, g in same_grads.items()}
        chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-9)


def test_no_decay_keeps_the_optimizer_state_it_always_had():
    """decay_updates 0 gives the base optimizer a plain float, so its state is the one
    checkpoints were written with before the decay existed; a decay adds exactly one leaf,
    the update count. Catches a schedule always on (old checkpoints would not load)."""
    params = to_jax(random_tree(np.random.default_rng(15)))
    plain = make_optimizer("adam", 1e-3, eps=1e-8).init(params)
    off = make_optimizer("adam", 1e-3, eps=1e-8, learning_rate_end=1e-4, decay_updates=0)
    on = make_optimizer("adam", 1e-3, eps=1e-8, learning_rate_end=1e-4, decay_updates=10)
    assert jax.tree.structure(off.init(params)) == jax.tree.structure(plain)
    assert len(jax.tree.leaves(on.init(params))) == len(jax.tree.leaves(plain)) + 1


def test_a_decay_that_rises_is_refused():
    with pytest.raises(ValueError, match="learning_rate_end <= learning_rate"):
        make_optimizer("adam", 1e-3, eps=1e-6, learning_rate_end=1e-2, decay_updates=5)
    with pytest.raises(ValueError, match="decay_start"):
        make_optimizer("adam", 1e-3, eps=1e-6, learning_rate_end=1e-4, decay_updates=5,
                       decay_start=-1)  # fmt: skip


def test_the_optimizer_state_shape_names_exactly_what_changes_the_states_structure():
    """Over every optimizer, clipping on and off, the three DC-ASGD settings, the decay on
    and off, for a server, a single process and a sync process: two configs have the same
    `optimizer_state_shape` exactly when their optimizers' states have the same tree
    structure. Catches a setting that reshapes the state but is not checked before a
    resume (the checkpoint would be called damaged), and one checked that does not."""
    import dataclasses
    import itertools

    from gorila_jax.core.config import Config, optimizer_state_shape, to_dict
    from gorila_jax.core.optim import config_optimizer

    params = jax.ShapeDtypeStruct((7,), jnp.float32)
    roles = {
        "server": dict(mode="gorila", single_process=False),
        "single": dict(mode="gorila", single_process=True),
        "sync": dict(mode="sync", single_process=False),
    }
    seen = []
    for name, clip, dc, decay, role in itertools.product(
        OPTIMIZER_NAMES, (0.0, 10.0), ("off", "constant", "adaptive"), (0, 10), roles
    ):
        config = dataclasses.replace(
            Config(), optimizer=name, max_grad_norm=clip, dc_asgd=dc,
            learning_rate_decay_updates=decay, **roles[role],
        )  # fmt: skip
        optimizer = config_optimizer(config, server=role == "server")
        structure = jax.tree.structure(jax.eval_shape(optimizer.init, params))
        seen.append(
            (optimizer_state_shape(to_dict(config)), structure, (name, clip, dc, decay, role))
        )
    for (shape_a, structure_a, a), (shape_b, structure_b, b) in itertools.combinations(seen, 2):
        assert (shape_a == shape_b) == (structure_a == structure_b), (a, b)
