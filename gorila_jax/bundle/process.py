"""The process of one bundle: meet the server's shards, then act, remember and learn until
its share of the run's frames is played.

`run_bundle` is what every process past the server's shards does: read each shard's
address from the rendezvous, build its environments, replay (restored from its last
checkpoint when there is one) and the remote learner that pushes gradients to every shard,
and run the actor-learner loop (`loop.run_actor_learner`) on `total_frames / bundles`
frames. Its files go to RUN_DIR/bundle{i}.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import jax

from gorila_jax.bundle.client import ServerConnection, ServerError
from gorila_jax.bundle.loop import make_replay, run_actor_learner
from gorila_jax.bundle.remote_learner import RemoteLearner
from gorila_jax.bundle.replay_checkpoint import replay_saver, restore_replay
from gorila_jax.core.config import Config, ConfigError, from_dict, training_settings, validate
from gorila_jax.core.model import Model
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.envs import make_env, model_of
from gorila_jax.io import logs
from gorila_jax.server.parameter_server import max_message_bytes
from gorila_jax.wire import credentials, rendezvous, transport
from gorila_jax.wire.join_file import JoinError, JoinInfo, read_join_file
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
    every server shard (or to its host's aggregator, which it sees as an unsharded
    server)."""
    shards = config.server_shards
    num_workers = len(placement.bundle_processes)
    worker = placement.worker_of(info.index)
    own_curve = rendezvous.own_curve_keys() if config.wire_security == "curve" else None
    meeting = rendezvous.open_rendezvous(info, keys)
    # With CURVE the connection's key names the worker: no credential to present.
    credential = "" if own_curve is not None else keys.worker_credential(worker)
    if own_curve is not None:
        meeting.publish_bundle_key(info.index, own_curve[0])
    aggregator = placement.aggregator_for(worker)
    if aggregator is not None:  # --aggregate-per-host: the host's aggregator is its server
        endpoints, curves = [meeting.aggregator_address(aggregator)], [None]
        names = [where(info, placement, placement.aggregator_processes[aggregator], "the server")]
    else:
        names = shard_names(info, placement)
        addresses = meeting.shard_addresses(shards, curve=own_curve is not None)
        endpoints = [address.endpoint for address in addresses]
        curves = [
            None if own_curve is None else transport.ClientCurve(*own_curve, address.curve_key)
            for address in addresses
        ]
    meeting.close()
    play(
        config,
        worker=worker,
        credential=credential,
        endpoints=endpoints,
        curves=curves,
        launched=num_workers,
        server_names=names,
        frame_budget=config.total_frames // num_workers,
        # A restarted bundle plays other episodes than its first start did.
        seed=config.seed + worker + 1 + 1000 * int(info.restarted),
        stop=stop,
    )


def where(info: rendezvous.ProcessInfo, placement: Placement, process: int, name: str) -> str:
    """`name` of a process of the run, with its task and host under SLURM (where a lost
    one must be found): "server shard 1 (task 3 on node2)"."""
    if info.launcher != "slurm":
        return name
    return f"{name} (task {process} on {placement.hosts[process]})"


def shard_names(info: rendezvous.ProcessInfo, placement: Placement) -> list[str]:
    """How a client of every server shard names each (`where`)."""
    shards = placement.shard_processes
    return [
        where(info, placement, process, "the server" if len(shards) == 1 else f"server shard {k}")
        for k, process in enumerate(shards)
    ]


def run_joining_bundle(config: Config, program_default: Config, stop: threading.Event) -> None:
    """`--join RUN_DIR`: one more bundle for the job running there. It reads the job's
    join file (its shards, the run secret, its config), asks server shard 0 for a worker
    index, then plays like a started bundle with that worker's credential, the run's
    settings, and a started bundle's share of the frames; SIGTERM takes it out again
    (its stop tells the server, and the run goes on). JoinError (one line) when there is
    no such job, it is full, or it trains something else."""
    run_dir = Path(config.join)
    invitation = read_join_file(run_dir)
    run_config = joining_config(config, program_default, invitation, run_dir)
    validate(run_config, local_device_count=jax.local_device_count())
    model = model_of(run_config)
    if transport.tree_fingerprint(model.shapes()) != invitation.fingerprint:
        raise JoinError(f"the job in {run_dir} trains another network than this program's")
    layout = ShardLayout.even(model.num_params, run_config.server_shards)
    if layout.num_shards != len(invitation.endpoints):
        raise JoinError(f"{run_dir}/join.json lists {len(invitation.endpoints)} server shards")
    door = ServerConnection(
        invitation.endpoints[0],
        credential=credentials.join_credential(invitation.secret),
        worker=0,
        fingerprint=invitation.fingerprint,
        num_params=layout.size(0),
        max_bytes=max_message_bytes(run_config, model.num_params),
        timeout_seconds=run_config.server_timeout_seconds,
        cancel=stop,
    )
    try:
        reply = door.request("join")
    except ServerError as error:
        if stop.is_set():
            return
        raise JoinError(why_not_joined(error, run_dir, invitation.endpoints[0])) from None
    finally:
        door.close()
    worker = reply.header["assigned"]
    logs.setup(f"bundle {worker + 1}")
    log.info(f"joined the job in {run_dir} as bundle {worker + 1} (worker {worker})")
    play(
        run_config,
        worker=worker,
        credential=credentials.worker_credential(invitation.secret, worker),
        endpoints=list(invitation.endpoints),
        curves=[None] * len(invitation.endpoints),
        launched=reply.header["launched"],
        frame_budget=reply.header["frame_budget"],
        seed=run_config.seed + worker + 1 + 1000 * (time.time_ns() % 997),
        stop=stop,
    )


def joining_config(
    config: Config, program_default: Config, invitation: JoinInfo, run_dir: Path
) -> Config:
    """The settings a joining bundle plays with: the running job's own, read from its
    join file. A program that trains another environment, or a training flag given to
    the joining bundle that the job does not have, is refused (JoinError): it would be
    silently replaced."""
    try:
        run_config = from_dict(invitation.config, program_default)
    except ConfigError as error:
        raise JoinError(f"{run_dir}/join.json: its config: {error}") from None
    if run_config.env_id != program_default.env_id:
        raise JoinError(
            f"the job in {run_dir} trains {run_config.env_id}, this program "
            f"{program_default.env_id}: join with the program that started it"
        )
    own, default, job = (
        training_settings(config),
        training_settings(program_default),
        (training_settings(run_config)),
    )
    differing = [name for name in own if own[name] != default[name] and own[name] != job[name]]
    if differing:
        name = differing[0]
        raise JoinError(
            f"--join plays with the job's settings: its {name} is {job[name]!r}, not "
            f"{own[name]!r} (drop --{name.replace('_', '-')})"
        )
    return dataclasses.replace(run_config, run_dir=str(run_dir), join=str(run_dir), resume=False)


def why_not_joined(error: ServerError, run_dir: Path, endpoint: str) -> str:
    """The one line for a join the job did not grant."""
    text = str(error)
    if error.lost:
        return (
            f"no answer to the join from {endpoint} ({text}): is the job in {run_dir} "
            "still running?"
        )
    if error.reason == "full":
        return f"the job in {run_dir} is full: {error.detail}"
    if error.reason == "bad_credential":
        return f"the server at {endpoint} is not the job of {run_dir}/join.json (a stale file?)"
    return f"the job in {run_dir} refused the join: {text}"


def play(
    config: Config,
    *,
    worker: int,
    credential: str,
    endpoints: list[str],
    curves: list[transport.ClientCurve | None],
    launched: int,
    frame_budget: int,
    seed: int,
    stop: threading.Event,
    server_names: list[str] | None = None,
) -> None:
    """Be bundle `worker + 1`: environments, replay (restored from its last checkpoint
    when there is one), the remote learner that pushes to every shard at `endpoints`, and
    the actor-learner loop for `frame_budget` frames (epsilon's schedule stretched over
    the `launched` bundles that share the run's frames). Files go to RUN_DIR/bundle{i}."""
    bundle = worker + 1  # its number in names and directories: bundle1, bundle2, ...
    validate(config, local_device_count=jax.local_device_count())
    env = make_env(config, seed=seed, training=True)
    try:
        replay = make_replay(config, env, seed=seed)
        replay_checkpointer, resume = restore_replay(
            config, replay, bundle=bundle, bundles=launched
        )
        model = Model.from_env(config, env)
        template = model.zeros()  # the params come from the server
        # One endpoint per server shard, or a single one: the host's aggregator.
        layout = ShardLayout.even(model.num_params, len(endpoints))
        connections = [
            ServerConnection(
                endpoint,
                credential=credential,
                worker=worker,
                fingerprint=transport.tree_fingerprint(template),
                num_params=layout.size(shard),
                max_bytes=max_message_bytes(config, model.num_params),
                timeout_seconds=config.server_timeout_seconds,
                cancel=stop,  # a signal ends any wait for the server, the first hello's too
                curve=curve,
            )
            for shard, (endpoint, curve) in enumerate(zip(endpoints, curves, strict=True))
        ]
        learner = RemoteLearner(
            config,
            model.network,
            template,
            connections,
            num_workers=max(launched, config.max_bundles),
            stop_event=stop,
            server_names=server_names,
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
                frame_budget=frame_budget,
                epsilon_frame_scale=launched,
                start_frames=learner.start_frames,
                stop_event=stop,
                resume=resume,
                checkpoint=replay_saver(replay_checkpointer, replay),
            )
        finally:
            learner.close(quick=stop.is_set())
        log.info(
            f"done: {result.frames:,} frames, "
            f"{result.updates:,} pushes ({learner.accepted:,} accepted, rejected "
            f"{learner.rejected or 'none'}), {learner.reconnects} reconnect(s) to the server, "
            f"mean return of the last 20: {result.mean_recent_return:.2f}"
        )
    finally:
        env.close()
