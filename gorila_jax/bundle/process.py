"""The process of one bundle: meet the server's shards, then act, remember and learn until
its share of the run's frames is played.

`run_bundle` is what every process past the server's shards does: read each shard's
address from the rendezvous, build its environments, replay (restored from its last
checkpoint when there is one) and the remote learner that pushes gradients to every shard,
and run the actor-learner loop (`loop.run_actor_learner`) on `total_frames / bundles`
frames. Its files go to RUN_DIR/bundle{i}.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import jax

from gorila_jax.bundle.client import ServerConnection
from gorila_jax.bundle.loop import make_replay, run_actor_learner
from gorila_jax.bundle.remote_learner import RemoteLearner
from gorila_jax.bundle.replay_checkpoint import replay_saver, restore_replay
from gorila_jax.core.config import Config, validate
from gorila_jax.core.model import Model
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.envs import make_env
from gorila_jax.server.parameter_server import max_message_bytes
from gorila_jax.wire import rendezvous, transport
from gorila_jax.wire.placement import Placement

log = logging.getLogger(__name__)


def run_bundle(
    config: Config,
    info: rendezvous.ProcessInfo,
    placement: Placement,
    keys: rendezvous.RunKeys,
    stop: threading.Event,
) -> None:
    """A process past the server shards: actors, replay and learner, pushing gradients to
    every server shard."""
    shards = config.server_shards
    num_workers = len(placement.bundle_processes)
    worker = placement.worker_of(info.index)
    bundle = worker + 1  # its number in names and directories: bundle1, bundle2, ...
    # A restarted bundle plays other episodes than its first start did.
    seed = config.seed + bundle + 1000 * int(info.restarted)
    own_curve = rendezvous.own_curve_keys() if config.wire_security == "curve" else None
    meeting = rendezvous.open_rendezvous(info, keys)
    # With CURVE the connection's key names the worker: no credential to present.
    credential = "" if own_curve is not None else keys.worker_credential(worker)
    if own_curve is not None:
        meeting.publish_bundle_key(info.index, own_curve[0])
    addresses = meeting.shard_addresses(shards, curve=own_curve is not None)
    meeting.close()
    validate(config, local_device_count=jax.local_device_count())
    env = make_env(config, seed=seed, training=True)
    try:
        replay = make_replay(config, env, seed=seed)
        replay_checkpointer, resume = restore_replay(
            config, replay, bundle=bundle, bundles=num_workers
        )
        model = Model.from_env(config, env)
        template = model.init(seed)
        layout = ShardLayout.even(model.num_params, shards)
        connections = [
            ServerConnection(
                address.endpoint,
                credential=credential,
                worker=worker,
                fingerprint=transport.tree_fingerprint(template),
                num_params=layout.size(shard),
                max_bytes=max_message_bytes(config, model.num_params),
                timeout_seconds=config.server_timeout_seconds,
                cancel=stop,  # a signal ends any wait for the server, the first hello's too
                curve=None
                if own_curve is None
                else transport.ClientCurve(*own_curve, address.curve_key),
            )
            for shard, address in enumerate(addresses)
        ]
        learner = RemoteLearner(
            config,
            model.network,
            template,
            connections,
            num_workers=num_workers,
            stop_event=stop,
        )
        log.info(
            f"{env.num_envs} envs, learner over {jax.local_device_count()} local device(s), "
            f"replay {config.replay_capacity:,}"
        )
        try:
            result = run_actor_learner(
                config,
                learner,
                env,
                replay,
                seed=seed,
                run_dir=Path(config.run_dir) / f"bundle{bundle}",
                bundle=bundle,
                frame_budget=config.total_frames // num_workers,
                epsilon_frame_scale=num_workers,
                start_frames=learner.start_frames,
                stop_event=stop,
                resume=resume,
                checkpoint=replay_saver(replay_checkpointer, replay),
            )
        finally:
            learner.close(quick=stop.is_set())
        log.info(
            f"done: {result.frames:,} frames, {result.updates:,} pushes "
            f"({learner.accepted:,} accepted, rejected {learner.rejected or 'none'}), "
            f"{learner.reconnects} reconnect(s) to the server, "
            f"mean return of the last 20: {result.mean_recent_return:.2f}"
        )
    finally:
        env.close()
