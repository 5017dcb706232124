"""The process of one parameter-server shard: bind, meet the bundles, restore, serve, and
leave the final slice.

`run_server` is what processes 0..S-1 of a run do (`--server-shards S`, default 1): build
the model's params (every shard the whole tree, from the run's seed, so that all agree),
bind a ZeroMQ socket, publish its address through the rendezvous, restore the latest
checkpoint of its own directory (RUN_DIR, or RUN_DIR/shard{k} of a split server), serve
until every bundle is done or a signal arrives, and write what it holds: an unsharded
server the whole RUN_DIR/params.msgpack, a shard its slice with its version
(`params_file.save_params_slice`), which `params_file.load_run_params` joins.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import jax
import zmq

from gorila_jax.core.config import Config, ConfigError, to_dict, validate
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.envs import model_of
from gorila_jax.io.checkpoint import (
    Checkpointer,
    CheckpointError,
    has_checkpoint,
    newest_checkpoint_version,
)
from gorila_jax.io.config_file import write_resolved
from gorila_jax.io.params_file import PARAMS_FILE, SLICE_FILE, save_params, save_params_slice
from gorila_jax.server.parameter_server import ParameterServer, max_message_bytes
from gorila_jax.server.server_stats import server_dir
from gorila_jax.wire import rendezvous, transport
from gorila_jax.wire.credentials import WorkerAuthority
from gorila_jax.wire.join_file import JoinInfo, remove_join_file, write_join_file
from gorila_jax.wire.placement import Placement

log = logging.getLogger(__name__)


def check_shard_layout(config: Config) -> None:
    """Refuse (ConfigError) more server shards than the network has parameters; every
    process asks before the rendezvous, so that all of them exit with the one line."""
    try:
        ShardLayout.even(model_of(config).num_params, config.server_shards)
    except ValueError as error:
        raise ConfigError(f"config.server_shards: {error}") from None


def check_server_files(run_dir: Path, shards: int) -> None:
    """Refuse (CheckpointError, one line) a run directory whose server checkpoints were
    written by a server split another way: a run resumes only with the same shard count
    (the shards' own checkpoints also record their layout)."""
    sharded = sorted(p.name for p in run_dir.glob("shard*") if has_checkpoint(p))
    if shards == 1 and sharded:
        raise CheckpointError(
            f"{run_dir} holds the checkpoints of a server split in {len(sharded)} shards "
            f"({', '.join(sharded)}); resume with --server-shards {len(sharded)}, or use "
            "another --run-dir"
        )
    if shards > 1 and has_checkpoint(run_dir):
        raise CheckpointError(
            f"{run_dir} holds the checkpoint of an unsharded server; resume with "
            "--server-shards 1, or use another --run-dir"
        )


def checkpoint_skew(run_dir: Path, shards: int) -> str:
    """How far apart the shards' newest checkpoints are, for the log of a resume: each
    shard checkpoints on its own clock, so a resumed server joins slices saved some
    updates apart (every push reaches every shard, so their versions compare). Reads the
    shards' directories (a shared run directory; a shard it cannot see shows as none)."""
    versions = [newest_checkpoint_version(server_dir(run_dir, k, shards)) for k in range(shards)]
    known = [v for v in versions if v is not None]
    spread = max(known) - min(known) if known else 0
    shown = ", ".join("none" if v is None else f"{v:,}" for v in versions)
    return f"the shards resume from checkpoints at versions {shown} ({spread:,} apart)"


def curve_workers(keys: list[bytes]) -> dict[bytes, int]:
    """Each bundle's CURVE public key -> its worker index (the keys in worker order);
    RendezvousError when two bundles gave the same key, which would make one of them
    the other."""
    workers = {key: worker for worker, key in enumerate(keys)}
    if len(workers) != len(keys):
        raise rendezvous.RendezvousError("two bundles published the same CURVE key")
    return workers


def run_server(
    config: Config,
    info: rendezvous.ProcessInfo,
    placement: Placement,
    keys: rendezvous.RunKeys,
    stop: threading.Event,
) -> None:
    """A shard's process: hold its slice of the params, apply pushes, publish its address,
    answer until done."""
    shard = placement.shard_of(info.index)
    run_dir = Path(config.run_dir)
    shards = config.server_shards
    own_dir = server_dir(run_dir, shard, shards)
    # First thing: a final slice left by an earlier sitting must not be read as this one's.
    (own_dir / SLICE_FILE).unlink(missing_ok=True)
    # A first start binds a free port itself (no probing race); a restart takes it back.
    port = rendezvous.own_port()
    model = model_of(config)
    max_bytes = max_message_bytes(config, model.num_params)
    context = zmq.Context.instance()
    curve, authenticator = None, None
    clients: dict[bytes, int] = {}  # with CURVE: each bundle's public key -> its worker
    meeting = rendezvous.open_rendezvous(info, keys)
    bundles = placement.bundle_processes
    # The server's workers: the bundles, or with --aggregate-per-host the aggregators.
    # Workers past the bundles started are for bundles that join (`--join`, token only).
    launched = placement.server_workers
    capacity = max(launched, config.max_bundles)
    if config.wire_security == "curve":
        curve = transport.ServerCurve(*rendezvous.own_curve_keys())
        clients.update(curve_workers(rendezvous.launcher_bundle_keys()))
        authenticator = transport.start_curve_authenticator(context, clients)
        authority = WorkerAuthority(capacity, curve_workers=clients)
    else:
        authority = WorkerAuthority(
            capacity, secret=keys.server_secret(), aggregators=bool(placement.aggregator_processes)
        )
    sock, endpoint = transport.make_server_socket(
        context, f"tcp://{rendezvous.reachable_host(info)}:{port}", max_bytes, curve=curve
    )
    # Bundles may connect now; their hellos wait in the socket until serve() starts (with
    # CURVE, they connect once the rendezvous has given this server their keys).
    meeting.publish_shard(
        shard, rendezvous.ShardAddress(endpoint, None if curve is None else curve.public)
    )
    if curve is not None and not clients:  # the local launcher's keys, where it gave them
        clients.update(curve_workers(meeting.bundle_keys(bundles)))
    joinable = shard == 0 and capacity > launched
    endpoints = []  # every shard's, for the join file
    if joinable:
        endpoints = [address.endpoint for address in meeting.shard_addresses(shards, curve=False)]
    meeting.close()
    validate(config, local_device_count=jax.local_device_count())
    server = ParameterServer(
        config,
        model.init(config.seed),
        num_workers=capacity,
        authority=authority,
        run_dir=run_dir,
        shard=shard,
        launched=launched,
    )
    checkpointer = None
    try:
        checkpointer = Checkpointer(own_dir, keep=config.checkpoint_keep)
        state, _ = server.checkpoint_state()
        restored = checkpointer.restore_latest(
            state,
            config=config,
            expect={"tree_fingerprint": server.fingerprint},
            force=config.force_resume,
        )
        if restored is None and config.resume:
            raise CheckpointError(f"--resume: no checkpoint in {checkpointer.directory}")
        if shard == 0:
            write_resolved(config, run_dir)
        if restored is not None:
            server.restore(restored.state, restored.meta)
            log.info(f"resumed from checkpoint {restored.version}")
            if shards > 1 and shard == 0:
                log.info(checkpoint_skew(run_dir, shards))
        held = server.layout.slice(shard)
        log.info(
            f"{config.env_id}: {server.total_params:,} params (this process holds "
            f"{held.start:,}..{held.stop - 1:,}), {server.num_workers} "
            f"{'aggregator' if placement.aggregator_processes else 'bundle'}(s), optimizer "
            f"{config.optimizer}, dc_asgd {config.dc_asgd}, gradient_part "
            f"{config.gradient_part}, listening on {endpoint}"
        )
        server.warm_up()
        if joinable:
            join_info = JoinInfo(
                tuple(endpoints), keys.server_secret(), server.fingerprint, config.env_id,
                launched, capacity, to_dict(config),
            )  # fmt: skip
            write_join_file(run_dir, join_info)
            room = capacity - launched
            log.info(f"room for {room} more bundle(s): python {sys.argv[0]} --join {run_dir}")
        server.serve(sock, endpoint, stop.is_set, checkpointer=checkpointer)
    finally:
        if shard == 0:
            remove_join_file(run_dir)
        sock.close(linger=2000)  # let the last stop ack leave before closing
        if authenticator is not None:
            authenticator.stop()
        if checkpointer is not None:
            checkpointer.close()
    save_final_params(server, run_dir)
    stats = server.stats()
    log.info(
        f"{'stopped' if stop.is_set() else 'done'}: {stats['updates']:,} updates, "
        f"checkpoint {server.checkpointed_version}, rejections {stats['rejections'] or 'none'}"
    )


def save_final_params(server: ParameterServer, run_dir: Path) -> Path:
    """What a server leaves when it stops: an unsharded server the whole params as
    RUN_DIR/params.msgpack, a shard its own slice with its version and the layout as
    RUN_DIR/shard{k}/params_slice.msgpack (`params_file.load_run_params` joins them)."""
    if server.layout.num_shards == 1:
        return save_params(server.params_tree(), run_dir / PARAMS_FILE)
    return save_params_slice(
        server.params,
        server_dir(run_dir, server.shard, server.layout.num_shards) / SLICE_FILE,
        shard=server.shard,
        bounds=server.layout.bounds,
        version=server.version,
    )
