"""Optimizers for the parameter server: DC-ASGD delay compensation and a small factory.

In Gorila the parameter server applies gradients that actor-learners computed on a copy of the
parameters that may be several updates old ("stale"). DC-ASGD (Zheng et al. 2017) corrects such a
gradient with a cheap first-order Taylor term built from the diagonal of the gradient outer
product, so that it approximates the gradient at the server's current parameters.

`dc_asgd` is an optax transform that needs two keyword arguments at update time, the server's
current ``params`` and the ``stale_params`` the gradient was computed on. `make_optimizer` builds
the full server optimizer (optional clipping, optional DC-ASGD, then the base optimizer, whose
learning rate may decay with `learning_rate_schedule`) behind a single update signature:
``update(grads, state, params=..., stale_params=...)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gorila_jax.core.config import OPTIMIZERS as OPTIMIZER_NAMES  # what make_optimizer accepts
from gorila_jax.core.config import Config, dc_asgd_lambda

RMSPROP_DECAY = 0.95
"""Squared-gradient decay of the DQN-style RMSProp (Mnih et al. 2015 used 0.95)."""

ADAGRAD_INITIAL_ACCUMULATOR = 0.1
"""Initial AdaGrad accumulator value (optax's default, kept explicit here)."""


class DcAsgdState(NamedTuple):
    """State of the `dc_asgd` transform.

    Attributes:
        mean_square: adaptive form: a tree with the structure, shapes and dtypes of the params,
            holding the running mean of the squared incoming gradients,
            ``ms <- momentum * ms + (1 - momentum) * g * g`` (starts at zeros). Constant form:
            ``optax.EmptyState()``, a placeholder with no leaves, so the state costs nothing.
    """

    mean_square: Any


def _validate_dc_asgd_args(lambda_: float, momentum: float, eps: float) -> None:
    # Written as `not (...)` so that NaN is rejected too.
    if not lambda_ >= 0:
        raise ValueError(f"dc_asgd: lambda_ must be >= 0, got {lambda_!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"dc_asgd: momentum must satisfy 0 <= momentum < 1, got {momentum!r}")
    if not eps > 0:
        raise ValueError(f"dc_asgd: eps must be > 0, got {eps!r}")


def dc_asgd(
    lambda_: float = 0.04,
    *,
    adaptive: bool = False,
    momentum: float = 0.95,
    eps: float = 1e-7,
) -> optax.GradientTransformationExtraArgs:
    """Delay-compensated gradients for asynchronous SGD (DC-ASGD).

    A gradient ``g`` computed at ``stale_params`` is corrected towards the gradient at the
    current ``params`` with the diagonal approximation of the Hessian ``lam * g * g``::

        g_compensated = g + lam * g * g * (params - stale_params)        (elementwise)

    Constant form (DC-ASGD-c): ``lam = lambda_``. Adaptive form (DC-ASGD-a): a running mean
    square of the gradient is first updated with the incoming gradient,
    ``ms <- momentum * ms + (1 - momentum) * g * g``, then ``lam = lambda_ / sqrt(ms + eps)``
    elementwise. The paper's adaptive defaults are ``lambda_=2``, ``momentum=0.95``.

    The transform only rewrites the gradient; chain it before an optimizer that turns the
    gradient into an update. ``optax.chain`` forwards keyword arguments to every member that
    accepts extra args, so ``stale_params`` reaches this transform through the chain.

    Args:
        lambda_: variance-control strength, ``>= 0``. ``0`` makes the transform the identity.
        adaptive: use the adaptive form (per-element ``lam`` scaled by the gradient's RMS).
        momentum: decay of the running mean square in the adaptive form, ``0 <= momentum < 1``.
            Unused by the constant form.
        eps: added to the mean square before the square root in the adaptive form, ``> 0``.
            Unused by the constant form.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose
        ``update(updates, state, params=None, *, stale_params=None, **extra_args)`` requires
        ``params`` and ``stale_params`` (trees with the structure of ``updates``) and ignores
        any other keyword. Its state is a `DcAsgdState`.

    Raises:
        ValueError: on an out-of-range constructor argument; at update time, when ``params``
            or ``stale_params`` is missing.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.chain(dc_asgd(0.04), optax.sgd(0.1))
        >>> params = {"w": jnp.ones(3)}
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.full(3, 0.5)}
        >>> stale = {"w": jnp.zeros(3)}
        >>> updates, state = opt.update(grads, state, params, stale_params=stale)
        >>> params = optax.apply_updates(params, updates)

    References:
        Zheng et al., "Asynchronous Stochastic Gradient Descent with Delay Compensation",
        ICML 2017. https://arxiv.org/abs/1609.08326
    """
    _validate_dc_asgd_args(lambda_, momentum, eps)

    def init_fn(params: optax.Params) -> DcAsgdState:
        if adaptive:
            return DcAsgdState(mean_square=jax.tree.map(jnp.zeros_like, params))
        return DcAsgdState(mean_square=optax.EmptyState())

    def update_fn(
        updates: optax.Updates,
        state: DcAsgdState,
        params: optax.Params | None = None,
        *,
        stale_params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, DcAsgdState]:
        del extra_args  # Other members of a chain may need them; this transform does not.
        if params is None:
            raise ValueError(
                "dc_asgd: `params` (the server's current parameters) is missing; it is needed "
                "to compute the delay params - stale_params that the compensation scales."
            )
        if stale_params is None:
            raise ValueError(
                "dc_asgd: keyword `stale_params` (the parameters the gradient was computed on) "
                "is missing; it is needed to compute the delay params - stale_params."
            )

        if adaptive:
            mean_square = jax.tree.map(
                lambda ms, g: (momentum * ms + (1.0 - momentum) * g * g).astype(ms.dtype),
                state.mean_square,
                updates,
            )
            compensated = jax.tree.map(
                lambda g, ms, p, s: (g + (lambda_ / jnp.sqrt(ms + eps)) * g * g * (p - s)).astype(
                    g.dtype
                ),
                updates,
                mean_square,
                params,
                stale_params,
            )
            return compensated, DcAsgdState(mean_square=mean_square)

        compensated = jax.tree.map(
            lambda g, p, s: (g + lambda_ * g * g * (p - s)).astype(g.dtype),
            updates,
            params,
            stale_params,
        )
        return compensated, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def learning_rate_schedule(
    learning_rate: float, end: float, *, decay_start: int, decay_updates: int
) -> float | optax.Schedule:
    """The learning rate by update count: `learning_rate` for the first `decay_start`
    updates, then falling linearly to `end` over `decay_updates` updates, `end` after.
    With `decay_updates` 0 it is the plain float, so an optimizer without a decay keeps the
    state it always had (a schedule adds an update count to the base optimizer's state).

    A late, lower step size is what settled the project's seed-0 Pong run for its +18
    evaluation (docs/pong: a quarter of 1e-4 over its last stretch)."""
    if decay_updates == 0:
        return learning_rate
    if not (end > 0 and decay_start >= 0 and decay_updates > 0):
        raise ValueError(
            "learning_rate_schedule: needs end > 0, decay_start >= 0 and decay_updates > 0, "
            f"got end={end!r}, decay_start={decay_start!r}, decay_updates={decay_updates!r}"
        )
    return optax.linear_schedule(
        learning_rate, end, transition_steps=decay_updates, transition_begin=decay_start
    )


def _base_optimizer(
    name: str, learning_rate: float | optax.Schedule, eps: float
) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate, eps=eps)
    if name == "rmsprop":
        # DQN-style RMSProp: uncentered, decay 0.95, eps inside the square root.
        return optax.rmsprop(
            learning_rate, decay=RMSPROP_DECAY, eps=eps, eps_in_sqrt=True, centered=False
        )
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "adagrad":
        return optax.adagrad(
            learning_rate, initial_accumulator_value=ADAGRAD_INITIAL_ACCUMULATOR, eps=eps
        )
    raise ValueError(f"unknown optimizer {name!r}; valid names are {', '.join(OPTIMIZER_NAMES)}")


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    eps: float,
    dc_asgd_lambda: float | None = None,
    dc_asgd_adaptive: bool = False,
    dc_asgd_momentum: float = 0.95,
    max_grad_norm: float | None = None,
    clipped_upstream: bool = False,
    learning_rate_end: float | None = None,
    decay_start: int = 0,
    decay_updates: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Builds the parameter server's optimizer.

    The chain is: global-norm clipping (if ``max_grad_norm`` is set), then DC-ASGD (if
    ``dc_asgd_lambda`` is set), then the base optimizer. Whatever the configuration, the result
    is called the same way, ``update(grads, state, params=params, stale_params=stale)``;
    ``stale_params`` is ignored when DC-ASGD is off.

    Base optimizers:

    - ``"adam"``: ``optax.adam(learning_rate, eps=eps)``.
    - ``"rmsprop"``: DQN-style RMSProp (Mnih et al. 2015), uncentered, squared-gradient decay
      0.95, ``eps`` added inside the square root, no momentum.
    - ``"sgd"``: plain SGD; ``eps`` is unused.
    - ``"adagrad"``: AdaGrad, the optimizer of the Gorila paper (Nair et al. 2015), initial
      accumulator 0.1.

    Args:
        name: one of `OPTIMIZER_NAMES`.
        learning_rate: step size, ``> 0``.
        eps: numerical-stability constant of the base optimizer (unused by ``"sgd"``).
        dc_asgd_lambda: DC-ASGD ``lambda_``; ``None`` disables delay compensation.
        dc_asgd_adaptive: use the adaptive DC-ASGD form.
        dc_asgd_momentum: running-mean-square decay of the adaptive DC-ASGD form.
        max_grad_norm: clip gradients to this global norm before anything else; ``None``
            disables clipping.
        clipped_upstream: the gradients arrive already clipped to ``max_grad_norm`` (a
            parameter server's: the bundle clips the whole gradient before the shards split
            it, see `gorila_jax.core.shard_layout`); the chain holds ``optax.identity()`` where
            the clipping would be, so its state has the same structure either way (both
            states are empty) and checkpoints load across the two.
        learning_rate_end, decay_start, decay_updates: the learning rate falls linearly
            from ``learning_rate`` to ``learning_rate_end`` over ``decay_updates`` updates
            after the first ``decay_start`` (`learning_rate_schedule`); ``decay_updates`` 0
            (the default) keeps it constant.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones) or an out-of-range
            numeric argument.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names are {', '.join(OPTIMIZER_NAMES)}"
        )
    if not learning_rate > 0:
        raise ValueError(f"make_optimizer: learning_rate must be > 0, got {learning_rate!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"make_optimizer: max_grad_norm must be > 0, got {max_grad_norm!r}")

    transforms: list[optax.GradientTransformation] = []
    if max_grad_norm is not None:
        clip = optax.identity() if clipped_upstream else optax.clip_by_global_norm(max_grad_norm)
        transforms.append(clip)
    if dc_asgd_lambda is not None:
        transforms.append(
            dc_asgd(dc_asgd_lambda, adaptive=dc_asgd_adaptive, momentum=dc_asgd_momentum)
        )
    if decay_updates and not (learning_rate_end is not None and learning_rate_end <= learning_rate):
        raise ValueError(
            "make_optimizer: a decay needs learning_rate_end <= learning_rate, got "
            f"{learning_rate_end!r} and {learning_rate!r}"
        )
    schedule = learning_rate_schedule(
        learning_rate,
        learning_rate if learning_rate_end is None else learning_rate_end,
        decay_start=decay_start,
        decay_updates=decay_updates,
    )
    transforms.append(_base_optimizer(name, schedule, eps))
    # optax.chain wraps every member with optax.with_extra_args_support, so members that do not
    # take extra keywords (clip_by_global_norm) simply never see `stale_params`.
    return optax.chain(*transforms)


def config_optimizer(config: Config, *, server: bool) -> optax.GradientTransformationExtraArgs:
    """The optimizer a run's config names, the one factory for the server and the single
    process: clipping when configured (on the server, in the bundle before the push: the
    chain keeps an identity in its place), then (on the server only, where gradients
    arrive late) DC-ASGD when configured, then the base optimizer, its learning rate
    decaying as configured."""
    compensate = server and config.dc_asgd != "off"
    return make_optimizer(
        config.optimizer,
        config.learning_rate,
        eps=config.optimizer_eps,
        max_grad_norm=config.max_grad_norm or None,
        dc_asgd_lambda=dc_asgd_lambda(config) if compensate else None,
        dc_asgd_adaptive=config.dc_asgd == "adaptive",
        clipped_upstream=server,
        learning_rate_end=config.learning_rate_end,
        decay_start=config.learning_rate_decay_start,
        decay_updates=config.learning_rate_decay_updates,
    )
