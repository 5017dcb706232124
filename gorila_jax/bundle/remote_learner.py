"""The learner of a Gorila bundle: its jitted step computes the gradient, the server's
shards apply it.

`RemoteLearner` is the bundle's `Updater` (see `loop.Updater`), shaped like the single
process's `LocalLearner`: its whole state is one `LearnerState` (the params the policy
acts with, the target network, the versions of the params' slices, the steps taken, the
gradients waiting for a `--push-every` mean). Its jitted step computes the gradient,
flattened, cut to the bundle's gradient part and clipped inside XLA; what crosses the
network is the `ShardedClient`'s business (`client.py`, no JAX there), to which each
gradient goes as a `Push` carrying all it needs. Pulled params come back as flat host
vectors and are put on the devices here, by the thread that acts with them.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gorila_jax.bundle.client import (
    HELLO_AGAIN_SECONDS,
    PUSH_QUEUE,
    PUSHES_IN_FLIGHT,
    QUICK_STOP_SECONDS,
    Push,
    ServerConnection,
    ShardedClient,
)
from gorila_jax.core.config import Config
from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.core.learner import local_mesh, make_flat_grad_step, shardings
from gorila_jax.core.replay import Sample
from gorila_jax.core.shard_layout import ShardLayout


class Waiting(NamedTuple):
    """Gradients summed until `push_every` have come (`--push-every K > 1`)."""

    total: Any  # their sum
    mean_abs_td: Any  # the sum of their batches' mean |TD error|
    versions: tuple[int, ...]  # the params versions of the oldest of them
    count: int


class LearnerState(NamedTuple):
    """Everything a bundle's learner holds between two steps."""

    params: Any  # on the devices: what the policy acts with and the gradient is taken at
    target_params: Any
    params_versions: tuple[int, ...]  # per server shard, the version of its slice
    updates: int  # learner steps taken
    frames: int = 0  # frames the bundle had played at its last step
    waiting: Waiting | None = None
    pull_due: bool = False  # a pull came due on a step that did not push: with the next


@jax.jit
def _add(total, grads):
    return jax.tree.map(jnp.add, total, grads)


@jax.jit
def _scale(total, factor):
    return jax.tree.map(lambda x: x * factor, total)


class RemoteLearner:
    """The Updater of a Gorila bundle: gradients go to the server, params come back.

    The target network is refreshed every `target_period` server updates and the acting
    params every `sync_every` learner steps, by pulls the client makes (a pull is asked
    for with the push of the step that makes it due).
    """

    def __init__(
        self,
        config: Config,
        network,
        params_template: Any,
        connections: list[ServerConnection],
        *,
        num_workers: int,
        stop_event: threading.Event | None = None,
        server_names: list[str] | None = None,
    ):
        self.config = config
        self._stop = stop_event or threading.Event()
        flat_template, self._unravel = ravel_pytree(params_template)
        worker = connections[0].worker
        layout = ShardLayout.even(int(flat_template.size), len(connections))
        owned = part_indices(
            layout.num_params, num_workers, worker, config.gradient_part, config.seed
        )
        if owned is None:  # every shard gets its whole slice
            pieces: list[slice | None] = [layout.slice(k) for k in range(layout.num_shards)]
        else:  # per shard, the positions of the pushed vector it gets (None: nothing)
            pieces = [
                positions if positions.stop > positions.start else None
                for positions, _ in layout.split_indices(owned)
            ]
        mesh = local_mesh()
        self._where = shardings(mesh)
        self.client = ShardedClient(
            connections,
            layout=layout,
            pieces=pieces,
            target_period=config.target_period,
            retry_seconds=config.server_retry_seconds,
            stop_event=self._stop,
            names=server_names,
        )
        self.start_frames = self.client.start_frames
        self._grad_step = make_flat_grad_step(
            network,
            double_dqn=config.double_dqn,
            huber_delta=config.huber_delta,
            mesh=mesh,
            owned=owned,
            max_grad_norm=config.max_grad_norm or None,
        )
        params = self._to_device(self.client.initial.flat)
        self.state = LearnerState(params, params, self.client.initial.versions, 0)

    # ---- what the loop and the bundle read ----------------------------------------------

    @property
    def updates(self) -> int:
        return self.state.updates

    @property
    def server_version(self) -> int:
        """Server updates: the mean of the shards' versions (the only version of one)."""
        return self.client.server_version

    @property
    def params(self) -> Any:
        return self.state.params

    @property
    def target_params(self) -> Any:
        return self.state.target_params

    @property
    def params_version(self) -> int:
        """The server updates the acting params stem from (the mean over their slices)."""
        versions = self.state.params_versions
        return sum(versions) // len(versions)

    @property
    def accepted(self) -> int:
        return self.client.accepted

    @property
    def rejected(self) -> dict[str, int]:
        return self.client.rejected

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    # ---- the Updater --------------------------------------------------------------------

    def _to_device(self, flat) -> Any:
        return jax.device_put(self._unravel(jnp.asarray(flat)), self._where.replicated)

    def _take_pulled(self) -> None:
        latest, target = self.client.latest()
        state = self.state
        if latest is not None:
            state = state._replace(
                params=self._to_device(latest.flat), params_versions=latest.versions
            )
        if target is not None:
            same = latest is not None and target.flat is latest.flat
            state = state._replace(
                target_params=state.params if same else self._to_device(target.flat)
            )
        self.state = state

    def acting_params(self) -> Any:
        """The newest params pulled from the server."""
        self._take_pulled()
        return self.state.params

    def learn(self, sample: Sample, frames: int = 0):
        """Compute this bundle's gradient and hand it to the client (the mean of
        `push_every` of them)."""
        self._take_pulled()
        state = self.state
        batch = jax.device_put(sample.transition, self._where.batch)
        weights = jax.device_put(sample.weights, self._where.batch)
        grads, metrics = self._grad_step(state.params, state.target_params, batch, weights)
        waiting = state.waiting
        if waiting is None:
            waiting = Waiting(grads, metrics.mean_abs_td, state.params_versions, 1)
        else:
            waiting = Waiting(
                _add(waiting.total, grads),
                waiting.mean_abs_td + metrics.mean_abs_td,
                waiting.versions,
                waiting.count + 1,
            )
        updates = state.updates + 1
        pull_due = state.pull_due or updates % self.config.sync_every == 0
        self.state = state._replace(
            updates=updates, frames=frames, waiting=waiting, pull_due=pull_due
        )
        if waiting.count >= self.config.push_every:
            self._push_waiting()
        return metrics

    def _push_waiting(self) -> None:
        """Hand the waiting gradients' mean to the client, with a pull if one is due. The
        mean of clipped gradients stays within the clip (the server refuses anything over
        it); it goes with the params versions of the oldest gradient in it, so the server
        judges its staleness by its stalest part."""
        state = self.state
        waiting = state.waiting
        if waiting is None:
            return
        self.state = state._replace(waiting=None, pull_due=False)
        total = waiting.total if waiting.count == 1 else _scale(waiting.total, 1.0 / waiting.count)
        self.client.push(
            Push(
                total,
                waiting.mean_abs_td / waiting.count,
                waiting.versions,
                state.frames,
                state.pull_due,
            )
        )

    def should_stop(self) -> bool:
        """Stop when the communication thread has failed or a signal arrived."""
        return self.client.failed() or self._stop.is_set()

    def close(self, *, quick: bool = False) -> None:
        """Push what waits, tell the server this bundle is done, close the sockets.

        `quick` (the run is being stopped by a signal): drop what waits and give the server
        only a moment to acknowledge, since it is stopping too.
        """
        if not quick:  # push_every > 1: the gradients waiting for a push are not lost
            self._push_waiting()
        timeout, shards = self.config.server_timeout_seconds, len(self.client.connections)
        # Not quick: the queued and in-flight pushes and two pulls, a lost shard's whole
        # retry window and its last hello, then one stop per shard, each within the timeout.
        requests = PUSH_QUEUE * 2 + PUSHES_IN_FLIGHT + 2 + shards
        waits = (
            (QUICK_STOP_SECONDS + 1) * shards
            if quick
            else requests * timeout + self.config.server_retry_seconds + HELLO_AGAIN_SECONDS + 5
        )
        self.client.close(quick=quick, timeout_seconds=waits)
