"""The process of one host's aggregator (`--aggregate-per-host`): bind where the host's
bundles reach it, say hello to every server shard as the server's worker `a`, and serve
its bundles until they are all done (`Aggregator.serve`).

It binds the host's own address (the one a shard would publish), publishes it through the
rendezvous for its bundles, and checks their credentials with the run secret, which it is
given like a shard. It needs the network's shape (the params fingerprint and size), not
the network: no checkpoint, no learner.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq

from gorila_jax.aggregator.aggregator import Aggregator
from gorila_jax.bundle.client import ServerConnection, ShardedClient
from gorila_jax.bundle.process import shard_names
from gorila_jax.core.config import Config
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.envs import model_of
from gorila_jax.server.parameter_server import max_message_bytes
from gorila_jax.wire import credentials, rendezvous, transport
from gorila_jax.wire.credentials import WorkerAuthority
from gorila_jax.wire.placement import Placement

log = logging.getLogger(__name__)


def run_aggregator(
    config: Config,
    info: rendezvous.ProcessInfo,
    placement: Placement,
    keys: rendezvous.RunKeys,
    stop: threading.Event,
) -> None:
    """Aggregator `placement.aggregator_of(info.index)`: its bundles' server, the shards'
    worker of that index."""
    index = placement.aggregator_of(info.index)
    workers = placement.workers_of(index)
    secret = keys.server_secret()
    model = model_of(config)
    max_bytes = max_message_bytes(config, model.num_params)
    context = zmq.Context.instance()
    port = rendezvous.own_port(rendezvous.ENV_AGGREGATOR_PORT)
    sock, endpoint = transport.make_server_socket(
        context, f"tcp://{rendezvous.reachable_host(info)}:{port}", max_bytes
    )
    try:
        meeting = rendezvous.open_rendezvous(info, keys)
        meeting.publish_aggregator(index, endpoint)
        addresses = meeting.shard_addresses(config.server_shards, curve=False)
        meeting.close()  # before any JAX computation (see `StoreRendezvous.close`)
        fingerprint = transport.tree_fingerprint(model.shapes())
        layout = ShardLayout.even(model.num_params, config.server_shards)
        connections = [
            ServerConnection(
                address.endpoint,
                credential=credentials.aggregator_credential(secret, index),
                worker=index,
                fingerprint=fingerprint,
                num_params=layout.size(shard),
                max_bytes=max_bytes,
                timeout_seconds=config.server_timeout_seconds,
                cancel=stop,
            )
            for shard, address in enumerate(addresses)
        ]
        upstream = ShardedClient(
            connections,
            layout=layout,
            pieces=[layout.slice(shard) for shard in range(layout.num_shards)],
            target_period=config.target_period,
            retry_seconds=config.server_retry_seconds,
            stop_event=stop,
            names=shard_names(info, placement),
        )
        aggregator = Aggregator(
            config,
            upstream,
            workers=workers,
            authority=WorkerAuthority(len(placement.bundle_processes), secret=secret),
            fingerprint=fingerprint,
            run_dir=Path(config.run_dir),
            index=index,
        )
        numbers = ", ".join(str(w + 1) for w in workers)
        log.info(
            f"aggregating bundle(s) {numbers} on {endpoint}, forwarding to "
            f"{layout.num_shards} server shard(s) at version {aggregator.version}"
        )
        aggregator.serve(sock, stop.is_set)
    finally:
        sock.close(linger=2000)  # let the last acks leave before closing
    stats = aggregator.stats()
    log.info(
        f"{'stopped' if stop.is_set() else 'done'}: {sum(aggregator.received.values()):,} "
        f"pushes from {len(workers)} bundle(s) in {stats['forwards']:,} forwards "
        f"({stats['gradients_per_forward']:.1f} a forward, at most {stats['largest_forward']}), "
        f"{stats['shards_accepted']:,} accepted by the shards, rejected "
        f"{stats['shards_rejected'] or 'none'}, refused here {stats['refused'] or 'none'}"
    )
