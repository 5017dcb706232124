"""The check every pushed gradient passes on arrival, at a shard and at an aggregator.

One pass over the gradient (its squared norm, which is not finite when an element is not)
refuses a non-finite gradient and one whose norm is over what the bundle's clipping allows
(`max_grad_norm`, with float32 slack; with clipping off, a norm whose square overflows
float32): a bundle with broken clipping must not poison Adam's second moments for
everyone. The mean of clipped gradients (`--push-every`, an aggregator's forward) stays
within the clip, so the same bound holds for them.
"""

from __future__ import annotations

import math

import numpy as np

from gorila_jax.core.config import Config
from gorila_jax.wire import transport

NORM_TOLERANCE = 1e-3  # relative slack on max_grad_norm for float32 rounding in the clip


def max_norm_squared(config: Config) -> float:
    """The largest squared norm a pushed gradient may have: the bundle clips the whole
    gradient to max_grad_norm, so any part of it is within it (with float32 slack);
    unclipped, the square must stay finite in float32 (Adam squares each element)."""
    if config.max_grad_norm:
        return (config.max_grad_norm * (1 + NORM_TOLERANCE)) ** 2
    return float(np.finfo(np.float32).max)


def gradient_refusal(
    grads: np.ndarray, mean_abs_td: float, limit_squared: float
) -> tuple[str, str] | None:
    """Why a gradient (flat float32) and its batch's mean |TD error| are refused, as
    (reason, message), or None when they pass: "non_finite" or "over_norm".

    An overflow in the norm warns: callers that judge many pushes in a row hold
    `np.errstate(over="ignore", invalid="ignore")` over all of them (entering it costs
    twice the dot product of a small slice)."""
    norm_squared = float(np.dot(grads, grads))
    if not math.isfinite(mean_abs_td) or (
        not math.isfinite(norm_squared) and not transport.all_finite([grads])
    ):
        return "non_finite", "gradient or mean_abs_td not finite"
    if not norm_squared <= limit_squared:
        return "over_norm", "gradient norm over max_grad_norm"
    return None
