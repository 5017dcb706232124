"""What one parameter-server shard holds, and the pure function that updates it.

A shard owns a contiguous slice of the flat float32 parameter vector (all of it when the
server is not split, see `gorila_jax.shard_layout`). Its state is the slice, the optax state
of the server's optimizer over that slice, and a version: the number of updates applied.
`apply(state, grads, ...)` returns the next state; nothing else changes parameters. An
update that would leave a NaN or an infinity in the params or the optimizer state is undone
inside the same jitted program: `apply` then returns the state it was given (version
unchanged) and `finite=False`.

A push may carry the whole slice's gradient or, under gradient sharding, the gradient of
some owned elements (`indices`, relative to the slice): the partial apply gathers those
elements of the params, of the stale params and of every element-wise optimizer statistic,
updates them and scatters them back, while scalar statistics (adam's step count) advance.

Without DC-ASGD the params and optimizer state are donated to the jitted apply (updated in
place: no allocation per push), so a state passed to `apply` must not be used again. With
DC-ASGD they are not donated, because the server keeps the params it sent to each bundle
(references: JAX arrays are immutable) to pass them back as `stale`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ShardState(NamedTuple):
    """A shard's params slice, its optimizer state and its version."""

    params: jax.Array  # (size,) float32
    opt_state: Any
    version: int


def init_shard_state(tx: optax.GradientTransformation, params: Any) -> ShardState:
    """Version 0 of a shard holding `params` (its flat slice)."""
    params = jnp.asarray(params, jnp.float32)
    return ShardState(params, tx.init(params), 0)


Apply = Callable[..., tuple[ShardState, bool]]


def make_apply(tx: optax.GradientTransformationExtraArgs, size: int, *, compensated: bool) -> Apply:
    """apply(state, grads, indices=None, stale=None) -> (state after one update, finite).

    `grads` is the whole slice's gradient when `indices` is None, else the gradient of the
    elements `indices` (int32, relative to the slice). `stale` (DC-ASGD only, required
    then) is the slice of the params the gradient was computed on.
    """

    def is_elementwise(leaf) -> bool:
        return getattr(leaf, "shape", None) == (size,)

    def full(params, opt_state, grads, stale):
        updates, opt_state = tx.update(grads, opt_state, params, stale_params=stale)
        return optax.apply_updates(params, updates), opt_state

    def part(params, opt_state, indices, grads_part, stale):
        owned = params[indices]
        owned_state = jax.tree.map(lambda x: x[indices] if is_elementwise(x) else x, opt_state)
        updates, new_owned_state = tx.update(
            grads_part, owned_state, owned, stale_params=stale[indices]
        )
        params = params.at[indices].set(owned + updates)
        opt_state = jax.tree.map(
            lambda whole, new: whole.at[indices].set(new) if is_elementwise(whole) else new,
            opt_state,
            new_owned_state,
        )
        return params, opt_state

    def guarded(update):
        def update_or_keep(params, opt_state, *args):
            new_params, new_state = update(params, opt_state, *args)
            floating = [
                leaf
                for leaf in jax.tree.leaves((new_params, new_state))
                if jnp.issubdtype(leaf.dtype, jnp.inexact)
            ]
            finite = jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in floating]))
            kept = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (new_params, new_state),
                (params, opt_state),
            )
            return *kept, finite

        return update_or_keep

    full, part = guarded(full), guarded(part)
    if compensated:
        full_jit, part_jit = jax.jit(full), jax.jit(part)
    else:
        full_jit = jax.jit(lambda p, s, g: full(p, s, g, p), donate_argnums=(0, 1))
        part_jit = jax.jit(lambda p, s, i, g: part(p, s, i, g, p), donate_argnums=(0, 1))

    def apply(state: ShardState, grads, indices=None, stale=None) -> tuple[ShardState, bool]:
        extra = (stale,) if compensated else ()
        if compensated and stale is None:
            raise ValueError("DC-ASGD needs the stale params the gradient was computed on")
        if indices is None:
            params, opt_state, finite = full_jit(state.params, state.opt_state, grads, *extra)
        else:
            params, opt_state, finite = part_jit(
                state.params, state.opt_state, indices, grads, *extra
            )
        finite = bool(finite)
        return ShardState(params, opt_state, state.version + int(finite)), finite

    return apply
