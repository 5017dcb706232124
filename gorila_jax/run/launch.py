"""Entry point of every run: single-process, a role under SLURM, or the local launcher.

`main` parses the config, then:
- `--single-process`: trains here (`gorila_jax.run.single_process`);
- started by srun or by the local launcher: joins jax.distributed and plays its role,
  processes 0..S-1 the parameter server's shards (`--server-shards`, default 1), every
  other process a bundle;
- started by hand without SLURM: becomes the local launcher, which starts the server's
  shards and `--workers` bundles on 127.0.0.1 (the same script, with GORILA_* variables),
  prefixes and forwards their output, stops all of them on Ctrl-C or SIGTERM, and when one dies
  unexpectedly stops the others and exits non-zero naming the process and its last error.
  If the launcher itself dies (even by SIGKILL), every process it started stops and is
  gone within `LAUNCHER_GONE_GRACE_SECONDS` plus a poll (`_die_with_launcher`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

from gorila_jax.core.config import Config, ConfigError, parse_cli, validate
from gorila_jax.io import logs
from gorila_jax.io.checkpoint import CheckpointError
from gorila_jax.io.config_file import write_resolved
from gorila_jax.io.files import make_private_dir, owner_only_files
from gorila_jax.wire import distributed

STOP_GRACE_SECONDS = 30.0
LAUNCHER_GONE_GRACE_SECONDS = 15.0  # a child of a dead launcher exits this long after it
LAUNCHER_POLL_SECONDS = 0.5
EXIT_STOPPED = 143  # 128 + SIGTERM: a process that stopped because it was told to
KEY_VALUE_TIMEOUT_SECONDS = 120.0

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(default: Config, *, description: str | None = None, args: list[str] | None = None) -> int:
    """Run the program described by the command line; returns the exit status."""
    argv = sys.argv[1:] if args is None else list(args)
    config = parse_cli(default, argv, description=description)
    # Params, replays and keys live in the run directory: it and all that every role (and
    # every process this one starts, which inherits the umask) writes there are the
    # owner's alone.
    previous_umask = owner_only_files()
    try:
        try:
            make_private_dir(Path(config.run_dir), create=False)
        except OSError as error:
            print(f"error: run directory {config.run_dir}: {error.strerror}", file=sys.stderr)
            return 2
        if config.single_process:
            from gorila_jax.run.single_process import train

            stop = _stop_on_signals()
            train(config, stop)
            return EXIT_STOPPED if stop.is_set() else 0
        if distributed.detect_launcher() == "none":
            return launch_local(config, argv)
        return run_role(config)
    except (ConfigError, MemoryError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        os.umask(previous_umask)


# ---- roles --------------------------------------------------------------------------------


def _stop_on_signals() -> threading.Event:
    """SIGTERM / SIGINT set the returned event, so loops end cleanly."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_role(config: Config) -> int:
    """Join the run and be one of its parameter-server shards (processes 0..S-1) or one of
    its bundles.

    A process the local launcher restarts cannot rejoin jax.distributed (the group is left
    after the rendezvous); it takes its index, the server's port and the token from the
    launcher's environment instead.
    """
    stop = _stop_on_signals()
    if distributed.ENV_LAUNCHER_PID in os.environ:
        _die_with_launcher(int(os.environ[distributed.ENV_LAUNCHER_PID]), stop)
    if distributed.ENV_RESTARTED in os.environ:
        info = distributed.ProcessInfo(
            int(os.environ[distributed.ENV_PROCESS_ID]),
            int(os.environ[distributed.ENV_NUM_PROCESSES]),
            "local",
        )
    else:
        info = distributed.initialize()
    shards = config.server_shards
    logs.setup(process_name(info.index, shards))
    if info.count <= shards:
        print(
            f"error: a Gorila run needs its {shards} server process(es) and at least one "
            f"bundle, and {info.count} process(es) were started; use srun -n "
            f"{shards + 2} or more, or --single-process",
            file=sys.stderr,
        )
        return 2
    if shards > 1:
        _check_shard_layout(config)
    # Every process, before the rendezvous: all of them stop with the one line at once.
    _check_server_files(Path(config.run_dir), shards)
    if info.index < shards:
        run_server(config, info, stop, shard=info.index)
    else:
        run_bundle(config, info, stop)
    return EXIT_STOPPED if stop.is_set() else 0


def _check_shard_layout(config: Config) -> None:
    """Refuse (ConfigError) more server shards than the network has parameters, in every
    process before the rendezvous, so that all of them exit with the one line."""
    from gorila_jax.core.shard_layout import ShardLayout
    from gorila_jax.envs import model_of

    try:
        ShardLayout.even(model_of(config).num_params, config.server_shards)
    except ValueError as error:
        raise ConfigError(f"config.server_shards: {error}") from None


def process_name(index: int, shards: int) -> str:
    """How a process of the run is named in its output: "server" (or "shard k" of a split
    server), or "bundle i" (i from 1)."""
    if index < shards:
        return "server" if shards == 1 else f"shard {index}"
    return f"bundle {index - shards + 1}"


def _die_with_launcher(launcher_pid: int, stop: threading.Event) -> None:
    """In a process of the local launcher: stop when the launcher dies, and be gone
    LAUNCHER_GONE_GRACE_SECONDS later whatever this process is waiting for.

    The kernel sends SIGTERM (`_stop_on_signals`) the moment the launcher dies: the
    parent-death signal, set here after exec (a `preexec_fn` runs between fork and exec,
    where a lock held by another launcher thread can deadlock the child). A thread also
    watches the parent pid, which catches a launcher that died before the signal was set,
    then gives the process the grace to finish (the server's final checkpoint) and ends
    it: a wait that does not look at `stop` (a rendezvous, a reply from a server that is
    gone) cannot keep it alive.
    """
    with contextlib.suppress(OSError, AttributeError):  # prctl is Linux only
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(LAUNCHER_POLL_SECONDS)
        stop.set()
        time.sleep(LAUNCHER_GONE_GRACE_SECONDS)
        os._exit(EXIT_STOPPED)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _check_devices(config: Config) -> None:
    """After the rendezvous (which must come before the XLA backend starts)."""
    import jax

    validate(config, local_device_count=jax.local_device_count())


def _rendezvous_server(
    shard: int, endpoint: str, token: str, curve_public: bytes | None, bundles: range
) -> list[bytes]:
    """Publish this server shard's address and token (and CURVE public key), collect the
    bundles' CURVE public keys (with `curve_public`; `bundles` are their process
    indices), then leave jax.distributed; the keys.

    Leaving means processes live and die independently afterwards: jax's health check
    would otherwise take every process down with any one of them.
    """
    if distributed.ENV_RESTARTED in os.environ:
        return []
    store = distributed.KeyValueStore()
    store.set(f"{distributed.KEY_ENDPOINT}/{shard}", endpoint)
    store.set(f"{distributed.KEY_TOKEN}/{shard}", token)
    keys = []
    if curve_public is not None:
        store.set(f"{distributed.KEY_SERVER_CURVE}/{shard}", curve_public.decode())
        for index in bundles:
            key = store.get(f"{distributed.KEY_BUNDLE_CURVE}{index}", KEY_VALUE_TIMEOUT_SECONDS)
            keys.append(key.encode())
    distributed.shutdown()
    return keys


class ServerAddress(NamedTuple):
    """How a bundle reaches one server shard."""

    endpoint: str
    token: str
    curve_key: bytes | None  # the shard's CURVE public key (with --wire-security curve)


def _rendezvous_bundle(index: int, shards: int, curve_public: bytes | None) -> list[ServerAddress]:
    """Every server shard's endpoint, token and, when this bundle has a CURVE public key
    (published here), CURVE public key: from the store, or from the launcher's env."""
    if distributed.ENV_RESTARTED in os.environ:
        ports = _env_list(distributed.ENV_SERVER_PORT)
        if len(ports) != shards:
            raise ConfigError("restarted bundle: a server shard never said which port it bound")
        keys = _env_list(distributed.ENV_CURVE_SERVER) or [""] * shards
        return [
            ServerAddress(
                f"tcp://127.0.0.1:{port}",
                os.environ[distributed.ENV_RUN_TOKEN],
                key.encode() if curve_public is not None and key else None,
            )
            for port, key in zip(ports, keys, strict=True)
        ]
    store = distributed.KeyValueStore()
    if curve_public is not None:
        store.set(f"{distributed.KEY_BUNDLE_CURVE}{index}", curve_public.decode())
    addresses = []
    for shard in range(shards):
        key = None
        if curve_public is not None:
            key = store.get(f"{distributed.KEY_SERVER_CURVE}/{shard}", KEY_VALUE_TIMEOUT_SECONDS)
        addresses.append(
            ServerAddress(
                store.get(f"{distributed.KEY_ENDPOINT}/{shard}", KEY_VALUE_TIMEOUT_SECONDS),
                store.get(f"{distributed.KEY_TOKEN}/{shard}", KEY_VALUE_TIMEOUT_SECONDS),
                None if key is None else key.encode(),
            )
        )
    distributed.shutdown()
    return addresses


def _own_curve_keys() -> tuple[bytes, bytes]:
    """This process's CURVE key pair: the local launcher's (it restarts processes with
    the same keys), or a new one."""
    import zmq

    public = os.environ.get(distributed.ENV_CURVE_PUBLIC)
    secret = os.environ.get(distributed.ENV_CURVE_SECRET)
    if public and secret:
        return public.encode(), secret.encode()
    return zmq.curve_keypair()


def _server_host(info: distributed.ProcessInfo) -> str:
    """127.0.0.1 for local runs; under SLURM the address other nodes reach this one at."""
    if info.launcher == "local":
        return "127.0.0.1"
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    peer = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "")
    if address.startswith("127.") and peer and not peer.startswith("127."):
        # The interface that routes to the node that ran srun (a UDP connect sends nothing).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            address = probe.getsockname()[0]
    return address


def _publish_port(endpoint: str) -> None:
    """Tell the local launcher the port the server bound (it restarts processes with it)."""
    path = os.environ.get(distributed.ENV_PORT_FILE)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(endpoint.rsplit(":", 1)[1])
        tmp.replace(path)


def run_server(
    config: Config, info: distributed.ProcessInfo, stop: threading.Event, *, shard: int = 0
) -> None:
    """Process `shard` (< server_shards): hold its slice of the params, apply pushes,
    publish its address, answer until done."""
    import zmq

    from gorila_jax.envs import model_of
    from gorila_jax.io.checkpoint import Checkpointer, CheckpointError
    from gorila_jax.io.params_file import save_params
    from gorila_jax.server.parameter_server import ParameterServer, max_message_bytes
    from gorila_jax.server.server_stats import server_dir
    from gorila_jax.wire import transport

    run_dir = Path(config.run_dir)
    # First thing: a final slice left by an earlier sitting must not be gathered as this
    # one's (shard 0 gathers as soon as it stops, maybe before this shard got far).
    (server_dir(run_dir, shard, config.server_shards) / PARAMS_SLICE).unlink(missing_ok=True)
    token = os.environ.get(distributed.ENV_RUN_TOKEN) or transport.new_run_token()
    # A first start binds a free port itself (no probing race); a restart takes it back.
    port = os.environ.get(distributed.ENV_SERVER_PORT, "0")
    model = model_of(config)
    max_bytes = max_message_bytes(config, model.num_params)
    context = zmq.Context.instance()
    curve, authenticator, clients = None, None, set()
    if config.wire_security == "curve":
        curve = transport.ServerCurve(*_own_curve_keys())
        clients.update(k.encode() for k in _env_list(distributed.ENV_CURVE_CLIENTS))
        authenticator = transport.start_curve_authenticator(context, clients)
    sock, endpoint = transport.make_server_socket(
        context, f"tcp://{_server_host(info)}:{port}", max_bytes, curve=curve
    )
    _publish_port(endpoint)
    # Bundles may connect now; their hellos wait in the socket until serve() starts (with
    # CURVE, they connect once the rendezvous has given this server their keys).
    public = None if curve is None else curve.public
    bundles = range(config.server_shards, info.count)
    clients.update(_rendezvous_server(shard, endpoint, token, public, bundles))
    _check_devices(config)
    params = model.init(config.seed)
    server = ParameterServer(
        config, params, num_workers=len(bundles), token=token, run_dir=run_dir, shard=shard
    )
    own_dir = server_dir(run_dir, shard, config.server_shards)
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
        held = server.layout.slice(shard)
        log.info(
            f"{config.env_id}: {server.total_params:,} params (this process holds "
            f"{held.start:,}..{held.stop - 1:,}), {server.num_workers} bundle(s), optimizer "
            f"{config.optimizer}, dc_asgd {config.dc_asgd}, shard_factor "
            f"{config.shard_factor}, listening on {endpoint}"
        )
        server.warm_up()
        server.serve(sock, endpoint, stop.is_set, checkpointer=checkpointer)
    finally:
        sock.close(linger=2000)  # let the last stop ack leave before closing
        if authenticator is not None:
            authenticator.stop()
        if checkpointer is not None:
            checkpointer.close()
    if config.server_shards == 1:
        save_params(server.params_tree(), run_dir / "params.msgpack")
    else:
        _save_sharded_params(server, run_dir, endpoint)
    stats = server.stats()
    log.info(
        f"{'stopped' if stop.is_set() else 'done'}: {stats['updates']:,} updates, "
        f"checkpoint {server.checkpointed_version}, rejections {stats['rejections'] or 'none'}"
    )


PARAMS_SLICE = "params_slice.npy"
GATHER_SECONDS = 30.0  # how long shard 0 waits for the others' final slices


def _check_server_files(run_dir: Path, shards: int) -> None:
    """Refuse (CheckpointError, one line) a run directory whose server checkpoints were
    written by a server split another way: a run resumes only with the same shard count
    (the shards' own checkpoints also record their layout)."""
    from gorila_jax.io.checkpoint import CheckpointError, has_checkpoint

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


def _save_sharded_params(server, run_dir: Path, address: str) -> None:
    """Every shard writes its final slice; shard 0 waits for the others' and saves the
    whole params as RUN_DIR/params.msgpack. Each shard deletes its own slice file when it
    starts, so a file found here was written by this sitting (even when shard 0 itself was
    restarted after another shard had finished)."""
    import io

    import numpy as np

    from gorila_jax.io.files import write_atomically
    from gorila_jax.io.params_file import save_params
    from gorila_jax.server.server_stats import server_dir

    shards = server.layout.num_shards
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(server.params, np.float32), allow_pickle=False)
    write_atomically(server.own_dir / PARAMS_SLICE, buffer.getvalue())
    if server.shard != 0:
        return
    deadline = time.monotonic() + GATHER_SECONDS
    slices: dict[int, np.ndarray] = {}
    while len(slices) < shards and time.monotonic() < deadline:
        for shard in range(shards):
            path = server_dir(run_dir, shard, shards) / PARAMS_SLICE
            if shard in slices or not path.exists():
                continue
            try:
                values = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                continue
            if values.dtype == np.float32 and values.shape == (server.layout.size(shard),):
                slices[shard] = values
        if len(slices) < shards:
            time.sleep(0.2)
    missing = sorted(set(range(shards)) - set(slices))
    if missing:
        log.warning(
            f"no final params from shard(s) {missing} within {GATHER_SECONDS:.0f}s; "
            "params.msgpack not written"
        )
        return
    flat = server.layout.join([slices[k] for k in range(shards)])
    save_params(server.unravel(flat), run_dir / "params.msgpack")
    server.write_stats(address)  # every shard has written its final figures by now


def run_bundle(config: Config, info: distributed.ProcessInfo, stop: threading.Event) -> None:
    """A process past the server shards: actors, replay and learner, pushing gradients to
    every server shard."""
    from jax.flatten_util import ravel_pytree

    from gorila_jax.bundle.client import RemoteLearner, ServerConnection
    from gorila_jax.bundle.loop import make_replay, run_actor_learner
    from gorila_jax.bundle.replay_checkpoint import replay_saver, restore_replay
    from gorila_jax.core.model import Model
    from gorila_jax.core.shard_layout import ShardLayout
    from gorila_jax.envs import make_env
    from gorila_jax.server.parameter_server import max_message_bytes
    from gorila_jax.wire import transport

    shards = config.server_shards
    num_workers = info.count - shards
    worker = info.index - shards
    bundle = worker + 1  # its number in names and directories: bundle1, bundle2, ...
    seed = config.seed + bundle + 1000 * int(distributed.ENV_RESTARTED in os.environ)
    own_curve = _own_curve_keys() if config.wire_security == "curve" else None
    addresses = _rendezvous_bundle(info.index, shards, None if own_curve is None else own_curve[0])
    _check_devices(config)
    env = make_env(config, seed=seed, training=True)
    try:
        replay = make_replay(config, env, seed=seed)
        replay_checkpointer, resume = restore_replay(
            config, replay, bundle=bundle, bundles=num_workers
        )
        model = Model.from_env(config, env)
        network, template = model.network, model.init(seed)
        num_params = int(ravel_pytree(template)[0].size)
        layout = ShardLayout.even(num_params, shards)
        connections = [
            ServerConnection(
                address.endpoint,
                token=address.token,
                worker=worker,
                fingerprint=transport.tree_fingerprint(template),
                num_params=layout.size(shard),
                max_bytes=max_message_bytes(config, num_params),
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
            network,
            template,
            connections,
            num_workers=num_workers,
            stop_event=stop,
        )
        import jax

        log.info(
            f"{env.num_envs} envs, learner over {jax.local_device_count()} local device(s), "
            f"replay {config.replay_capacity:,}"
        )
        budget = config.total_frames // num_workers
        try:
            result = run_actor_learner(
                config,
                learner,
                env,
                replay,
                seed=seed,
                run_dir=Path(config.run_dir) / f"bundle{bundle}",
                bundle=bundle,
                frame_budget=budget,
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


# ---- local launcher -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for the jax.distributed coordinator,
    whose port every process must know before any starts; the server binds its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Child:
    """One started process: its name, its output forwarded with a prefix, its last lines."""

    def __init__(self, name: str, command: list[str], environ: dict):
        self.name = name
        self.last_lines: collections.deque[str] = collections.deque(maxlen=30)
        self.process = subprocess.Popen(
            command,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._forward, daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if line.strip():
                self.last_lines.append(line)
            tag = f"[{self.name}]"
            print(line if line.startswith(tag) else f"{tag} {line}", flush=True)

    def last_error(self) -> str:
        """The most telling recent line: the last one that names an error, else the last."""
        for line in reversed(self.last_lines):
            lowered = line.lower()
            if "error" in lowered or "exception" in lowered or "killed" in lowered:
                return line.strip()
        return self.last_lines[-1].strip() if self.last_lines else "(no output)"

    def finish_output(self) -> None:
        """Wait for the output reader to drain."""
        self._reader.join(timeout=5)


def _env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list (empty when unset)."""
    return [item for item in os.environ.get(name, "").split(",") if item]


def _launcher_curve_keys(count: int, shards: int) -> dict[int, dict[str, str]]:
    """The CURVE environment of each process index: its key pair, and every server shard's
    public key (bundles) or every bundle's (shards). Made once, so restarts reuse them."""
    import zmq

    pairs = [tuple(key.decode() for key in zmq.curve_keypair()) for _ in range(count)]
    shard_keys = ",".join(pair[0] for pair in pairs[:shards])
    bundle_keys = ",".join(pair[0] for pair in pairs[shards:])
    environs = {}
    for index, (public, secret) in enumerate(pairs):
        own = {distributed.ENV_CURVE_PUBLIC: public, distributed.ENV_CURVE_SECRET: secret}
        if index < shards:
            own[distributed.ENV_CURVE_CLIENTS] = bundle_keys
        else:
            own[distributed.ENV_CURVE_SERVER] = shard_keys
        environs[index] = own
    return environs


def stop_children(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every live child, wait up to `grace` seconds, then SIGKILL what is left."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    for child in children:
        child.finish_output()


def launch_local(config: Config, argv: list[str]) -> int:
    """Start `config.server_shards` server processes and `config.workers` bundles here and
    supervise them.

    A process that dies unexpectedly (a signal, or an exit status other than 0 and 2) is
    restarted up to `config.max_restarts` times: a bundle rejoins the server, a server
    shard resumes from its last checkpoint on the same port (the port its first start
    bound and wrote into a file of this launcher's private temporary directory) while the
    others go on. Past that, every process is stopped and the exit is 1; a configuration
    error (status 2) of any process stops all and the exit is 2.
    """
    from gorila_jax.wire import transport

    logs.setup("launcher")
    shards = config.server_shards
    if shards > 1:
        _check_shard_layout(config)  # before starting anything
    _check_server_files(Path(config.run_dir), shards)
    count = config.workers + shards
    private = Path(tempfile.mkdtemp(prefix="gorila-launcher-"))
    port_files = [private / f"server_port.{shard}" for shard in range(shards)]
    environ = dict(os.environ)
    environ[distributed.ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
    environ[distributed.ENV_NUM_PROCESSES] = str(count)
    environ[distributed.ENV_RUN_TOKEN] = transport.new_run_token()
    environ[distributed.ENV_LAUNCHER_PID] = str(os.getpid())
    environ.pop(distributed.ENV_SERVER_PORT, None)
    environ.pop(distributed.ENV_PORT_FILE, None)
    environ["PYTHONUNBUFFERED"] = "1"
    curve_keys = _launcher_curve_keys(count, shards) if config.wire_security == "curve" else {}
    command = [sys.executable, os.path.abspath(sys.argv[0]), *argv]
    servers = "1 parameter server" if shards == 1 else f"a parameter server in {shards} shards"
    print(
        f"local run: {servers} + {config.workers} bundle(s) on 127.0.0.1, run dir {config.run_dir}",
        flush=True,
    )
    interrupted = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        interrupted.set()

    def start(index: int, restarted: bool) -> Child:
        child_environ = {
            **environ,
            distributed.ENV_PROCESS_ID: str(index),
            **curve_keys.get(index, {}),
        }
        if index < shards:
            child_environ[distributed.ENV_PORT_FILE] = str(port_files[index])
        if restarted:
            child_environ[distributed.ENV_RESTARTED] = "1"
            # A shard takes back its own port; a bundle gets every shard's.
            mine = port_files[index : index + 1] if index < shards else port_files
            ports = [path.read_text() for path in mine if path.exists()]
            if len(ports) == len(mine):
                child_environ[distributed.ENV_SERVER_PORT] = ",".join(ports)
        return Child(process_name(index, shards), command, child_environ)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    restarts = [0] * count
    try:
        children = [start(index, restarted=False) for index in range(count)]
        while not interrupted.is_set():
            for index, child in enumerate(children):
                code = child.process.poll()
                if code in (None, 0):
                    continue
                child.finish_output()
                if code == EXIT_STOPPED:
                    # SIGTERM / SIGINT reached this process (preemption): stop the whole run.
                    log.warning(f"stopping: {child.name} was stopped by a signal, stopping the run")
                    stop_children(children)
                    return EXIT_STOPPED
                if code != 2 and restarts[index] < config.max_restarts:
                    restarts[index] += 1
                    log.warning(
                        f"{child.name} (pid {child.process.pid}) died with status "
                        f"{code}: {child.last_error()}; restarting it "
                        f"({restarts[index]}/{config.max_restarts})"
                    )
                    children[index] = start(index, restarted=True)
                    continue
                stop_children(children)
                log.error(
                    f"{child.name} (pid {child.process.pid}) exited with status "
                    f"{code}: {child.last_error()}"
                )
                return 2 if code == 2 else 1
            if all(child.process.poll() == 0 for child in children):
                for child in children:
                    child.finish_output()
                return 0
            interrupted.wait(0.2)
        log.warning("stopping: signal received, stopping every process")
        stop_children(children)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(private, ignore_errors=True)


__all__ = ["Child", "free_port", "launch_local", "main", "run_role", "stop_children"]
