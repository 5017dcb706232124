"""How the processes of a run find each other: who they are, and where the server's shards
listen.

Every process of a run calls `initialize()` once, before any other JAX call:
- under SLURM (`srun`), `jax.distributed.initialize()` reads the job's variables itself;
- under the local launcher, the parent passes the coordinator address, the process count
  and the index through GORILA_* environment variables, and the coordinator listens on
  127.0.0.1 only;
- otherwise the process is alone (single-process training).

`place_roles` says which process is which (`gorila_jax.wire.placement`): S of them the
parameter server's shards (`--server-shards S`, default 1), every other a bundle. The
roles then meet through one interface, `Rendezvous`: a shard publishes its `ShardAddress`
(endpoint, CURVE public key) and reads the bundles' CURVE keys; a bundle publishes its
CURVE key and reads every shard's address. Secret keys never leave the process that made
them, and no credential is ever published.

What each process holds (`RunKeys`, `run_keys`): the rendezvous key, which signs every
value this module publishes in the store, with its name and the job's step
(`store_context`; HMAC: a value without the right signature is refused, so a process
outside the run that reaches the store cannot plant an address or a CURVE key, nor replay
one of an earlier job);
the run secret, from which the shards check each worker's credential
(`gorila_jax.wire.credentials`); and a bundle's own credential. The local launcher makes
the secret and hands the shards the secret, each bundle its own credential only, and
every process the rendezvous key. Under SLURM every task reads the secret, from
GORILA_RUN_SECRET in the job's environment (`srun` passes it to every task), or else from
RUN_DIR/run_secret, which the first task writes (readable by its owner only) and the
others read, so a run directory every host shares needs nothing set; tasks that hold
different secrets stop at the first signed value with one line saying so. The store
itself listens only on the address the other tasks reach it at
(`slurm_coordinator_bind_address`).

Two backends implement the interface:

- `StoreRendezvous`: jax.distributed's key-value store, for every first start (under SLURM
  and the local launcher alike); `close` leaves the group, so processes live and die
  independently afterwards. This module is the only place that touches that (private)
  JAX API.
- `LauncherRendezvous`: a process the local launcher restarts cannot rejoin
  jax.distributed (the group was left after the first rendezvous); it reads what it needs
  from the launcher's variables instead: its index, the ports the shards bound first (each
  shard writes its port into a file the launcher names) and the CURVE keys the launcher
  made for every process (its keys, `RunKeys`, come from the same variables as at a first
  start).

`open_rendezvous` picks the backend, so the roles have no "restarted" branch of their own.

A sync run (`--mode sync`) has no server: its processes stay in the jax.distributed group
for the whole run and compute together (`initialize(collectives=True)`); they meet only
through `StoreRendezvous.exchange`, to compare what each starts from.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from gorila_jax.wire import credentials
from gorila_jax.wire.placement import Placement, place

log = logging.getLogger(__name__)

ENV_COORDINATOR = "GORILA_COORDINATOR"
ENV_NUM_PROCESSES = "GORILA_NUM_PROCESSES"
ENV_PROCESS_ID = "GORILA_PROCESS_ID"
# A restarted process of the local launcher: the port a server shard bound before (its
# own), or every shard's, comma-separated (a bundle).
ENV_SERVER_PORT = "GORILA_SERVER_PORT"
# A restarted aggregator's own port, or a restarted bundle's aggregator's (--aggregate-per-host).
ENV_AGGREGATOR_PORT = "GORILA_AGGREGATOR_PORT"
ENV_RENDEZVOUS_KEY = "GORILA_RENDEZVOUS_KEY"  # the local launcher's, for every process
ENV_RESTARTED = "GORILA_RESTARTED"
ENV_PORT_FILE = "GORILA_PORT_FILE"  # where the local server writes the port it bound
ENV_LAUNCHER_PID = "GORILA_LAUNCHER_PID"
# --wire-security curve under the local launcher: this process's CURVE key pair, the
# server shards' public keys (bundles) and the bundles' (shards), comma-separated.
ENV_CURVE_PUBLIC = "GORILA_CURVE_PUBLIC"
ENV_CURVE_SECRET = "GORILA_CURVE_SECRET"
ENV_CURVE_SERVER = "GORILA_CURVE_SERVER"
ENV_CURVE_CLIENTS = "GORILA_CURVE_CLIENTS"
KEY_ENDPOINT = "gorila/server_endpoint"  # + "/k": server shard k's address
KEY_SERVER_CURVE = "gorila/curve/server"  # + "/k": server shard k's CURVE public key
KEY_AGGREGATOR = "gorila/aggregator"  # + "/a": aggregator a's address
KEY_BUNDLE_CURVE = "gorila/curve/bundle"  # + the process index: a bundle's public key
KEY_EXCHANGE = "gorila/exchange"  # + "/<name>/i": what process i gave `exchange(name, ...)`
KEY_VALUE_TIMEOUT_SECONDS = 120.0
# A sync run's processes meet at every learner step: one that stops answering (hung, not
# dead: a dead one fails the others' next step at once, where each process has one device)
# makes jax's coordination service end the others after this long.
SYNC_HEARTBEAT_SECONDS = 30
SECRET_FILE = "run_secret"  # under SLURM without GORILA_RUN_SECRET: RUN_DIR/run_secret
SECRET_FILE_WAIT_SECONDS = 30.0  # how long a task waits for the first task to write it


class RendezvousError(RuntimeError):
    """The run's processes could not meet; the message is one line."""


class ProcessInfo(NamedTuple):
    """This process's place in the run."""

    index: int
    count: int
    launcher: str  # "slurm", "local" or "none"
    restarted: bool = False  # restarted by the local launcher: it cannot rejoin the group


class ShardAddress(NamedTuple):
    """How a bundle reaches one server shard."""

    endpoint: str
    curve_key: bytes | None  # the shard's CURVE public key (with --wire-security curve)


class RunKeys(NamedTuple):
    """The keys this process holds (see the module docstring)."""

    rendezvous_key: str  # signs the store's values (every process)
    secret: str | None  # the run secret (the shards; every task under SLURM)
    credential: str | None  # this bundle's own credential (a local bundle)

    def worker_credential(self, worker: int) -> str:
        """The credential a bundle presents as `worker`: the one it was given, or the one
        the run secret derives."""
        if self.credential is not None:
            return self.credential
        if self.secret is None:
            raise RendezvousError(f"worker {worker} was given no credential")
        return credentials.worker_credential(self.secret, worker)

    def server_secret(self) -> str:
        """The run secret, which a shard needs to check every worker's credential."""
        if self.secret is None:
            raise RendezvousError("this server shard was given no run secret")
        return self.secret


def run_keys(info: ProcessInfo, run_dir: Path) -> RunKeys:
    """This process's keys: the local launcher's variables, or under SLURM the run secret
    (`slurm_run_secret`) and what it derives. RendezvousError (one line) when they are
    missing or malformed."""
    if info.launcher == "local":
        key = os.environ.get(ENV_RENDEZVOUS_KEY)
        if not key:
            raise RendezvousError(f"the local launcher gave no {ENV_RENDEZVOUS_KEY}")
        return RunKeys(
            key,
            os.environ.get(credentials.ENV_RUN_SECRET) or None,
            os.environ.get(credentials.ENV_WORKER_CREDENTIAL) or None,
        )
    secret = slurm_run_secret(run_dir)
    return RunKeys(credentials.rendezvous_key(secret), secret, None)


def slurm_run_secret(run_dir: Path) -> str:
    """The run secret of a task under SLURM: GORILA_RUN_SECRET, or RUN_DIR/run_secret,
    written by whichever task comes first (atomically: a private draft of its own, linked
    into place, so a reader sees a whole file or none) and read by the others, waiting up
    to `SECRET_FILE_WAIT_SECONDS` for it where a shared directory is slow to show it. A
    file another account owns or could read is refused. RendezvousError (one line) when
    there is no secret to be had."""
    given = os.environ.get(credentials.ENV_RUN_SECRET)
    if given:
        try:
            return credentials.check_run_secret(given.strip(), credentials.ENV_RUN_SECRET)
        except ValueError as error:
            raise RendezvousError(str(error)) from None
    path = Path(run_dir) / SECRET_FILE
    hint = f"(or export {credentials.ENV_RUN_SECRET} before srun)"
    try:
        if not path.exists():
            _write_secret_file(path)
    except OSError as error:
        raise RendezvousError(f"run secret {path}: {error.strerror or error} {hint}") from None
    deadline = time.monotonic() + SECRET_FILE_WAIT_SECONDS
    while True:
        try:
            status = path.stat()
            if status.st_uid != os.getuid() or status.st_mode & 0o077:
                raise RendezvousError(
                    f"run secret {path} is another account's or readable by others: remove "
                    f"it {hint}"
                )
            return credentials.check_run_secret(path.read_text().strip(), str(path))
        except (FileNotFoundError, ValueError) as error:
            if time.monotonic() > deadline:
                raise RendezvousError(f"run secret {path}: {error} {hint}") from None
            time.sleep(0.2)  # another task's file, not visible here yet
        except OSError as error:
            raise RendezvousError(f"run secret {path}: {error.strerror or error} {hint}") from None


def _write_secret_file(path: Path) -> None:
    """Make `path` a new run secret unless another task has made it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(draft, flags, 0o600), "w") as file:
        file.write(credentials.new_run_secret() + "\n")
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(draft, path)  # fails if another task's is there first: theirs counts
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)


def detect_launcher(environ: dict | None = None) -> str:
    """Who started this process: the local launcher, SLURM (srun with tasks), or nobody."""
    environ = os.environ if environ is None else environ
    if ENV_COORDINATOR in environ:
        return "local"
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return "slurm"
    return "none"


def initialize(timeout_seconds: int = 120, *, collectives: bool = False) -> ProcessInfo:
    """Join the run's jax.distributed group (or stay alone) and say who this process is.

    A process the local launcher restarted does not join (the group is gone): its index
    and the process count come from the launcher's variables. With `collectives` (a sync
    run, whose processes compute together through the group for the whole run), CPU
    collectives go through gloo (jax has none across CPU processes otherwise; GPUs use
    NCCL whatever this says).
    """
    launcher = detect_launcher()
    if launcher == "none":
        return ProcessInfo(0, 1, "none")
    if launcher == "local" and ENV_RESTARTED in os.environ:
        index, count = int(os.environ[ENV_PROCESS_ID]), int(os.environ[ENV_NUM_PROCESSES])
        return ProcessInfo(index, count, launcher, restarted=True)
    import jax

    # jax's preemption service replaces the process's SIGTERM handler with one that only
    # records the signal, so scancel, sbatch --signal and the local launcher's stop would
    # no longer reach the run's handler; the run stops through its own handler instead.
    jax.config.update("jax_enable_preemption_service", False)
    options = {}
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        options["heartbeat_timeout_seconds"] = SYNC_HEARTBEAT_SECONDS
    if launcher == "local":
        coordinator = os.environ[ENV_COORDINATOR]
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            initialization_timeout=timeout_seconds,
            # jax's default binds the coordinator on every interface ([::]:port).
            coordinator_bind_address=coordinator,
            **options,
        )
    else:
        check_task_0_on_the_first_node()
        bind = slurm_coordinator_bind_address()
        if bind is not None:
            options["coordinator_bind_address"] = bind
        jax.distributed.initialize(initialization_timeout=timeout_seconds, **options)
    # Read the index from the distributed client, not jax.process_index(): that would start
    # the XLA backend inside the group, and processes must start theirs only after leaving
    # it (see `StoreRendezvous.close`).
    from jax._src import distributed

    state = distributed.global_state
    return ProcessInfo(int(state.process_id), int(state.num_processes), launcher)


def check_task_0_on_the_first_node() -> None:
    """jax.distributed puts a SLURM step's coordinator on the step's first node, and task 0
    runs it: a task 0 placed elsewhere (SLURM_HOSTFILE, --distribution=arbitrary) could
    neither bind it nor be reached there. RendezvousError (one line) for task 0 off the
    first node; the other tasks then stop when their wait for the coordinator times out."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    own = os.environ.get("SLURMD_NODENAME")
    if os.environ.get("SLURM_PROCID") != "0" or not own:
        return
    if any(name.startswith("JAX_COORDINATOR") for name in os.environ):
        return  # the user chose the coordinator
    try:
        first = SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[0]
    except (KeyError, ValueError):
        return
    if own != first:
        raise RendezvousError(
            f"task 0 runs on {own}, but jax.distributed puts the run's coordinator on the "
            f"step's first node, {first}: give task 0 that node (srun's block or cyclic "
            "distribution do; with SLURM_HOSTFILE, list it first)"
        )


def slurm_coordinator_bind_address() -> str | None:
    """Where the store of a SLURM run listens (process 0 binds it): the address the first
    node's name resolves to, which is where every task, process 0 included, connects,
    rather than every interface (jax's default). None, jax's default, where that would
    not work or is not ours to choose: the user set a JAX_COORDINATOR_* variable, the
    name cannot be resolved, or it resolves to a loopback address (Debian's hosts file)
    on a step of several nodes, where the other nodes reach another address (a warning
    says so)."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    if any(name.startswith("JAX_COORDINATOR") for name in os.environ):
        return None
    try:
        host, port = SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)
        address = socket.gethostbyname(host)
    except (KeyError, ValueError, OSError):
        return None
    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    if address.startswith("127.") and int(nodes or 1) > 1:
        if os.environ.get("SLURM_PROCID") == "0":
            log.warning(
                f"{host} resolves to {address} here and to another address on the other "
                "nodes: the rendezvous store listens on every interface (map the node's "
                "name to its cluster address to narrow it)"
            )
        return None
    return f"{address}:{port}"


class Rendezvous(Protocol):
    """Where the shards publish their addresses and the bundles their CURVE keys."""

    def publish_shard(self, shard: int, address: ShardAddress) -> None:
        """Make shard `shard`'s address known to the bundles."""

    def shard_addresses(self, shards: int, *, curve: bool) -> list[ShardAddress]:
        """Every shard's address (waiting for them); CURVE keys when `curve`."""

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        """Make the CURVE public key of the bundle of process `index` known."""

    def publish_aggregator(self, aggregator: int, endpoint: str) -> None:
        """Make aggregator `aggregator`'s address known to its bundles."""

    def aggregator_address(self, aggregator: int) -> str:
        """Aggregator `aggregator`'s address (waiting for it)."""

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        """The CURVE public keys of the bundles of processes `indices` (waiting for them)."""

    def close(self) -> None:
        """Done meeting: from here on, this process lives and dies on its own."""


class StoreRendezvous:
    """The rendezvous through jax.distributed's key-value store (a first start).

    Under the local launcher a shard also writes the port it bound into the launcher's
    port file, so that the launcher can restart processes with it (`LauncherRendezvous`).
    """

    def __init__(self, key: str, timeout_seconds: float = KEY_VALUE_TIMEOUT_SECONDS):
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RendezvousError("jax.distributed is not initialised: call initialize() first")
        self._client = client
        self._key = key
        self._context = store_context()
        self._timeout_ms = int(timeout_seconds * 1000)

    def _set(self, name: str, value: str) -> None:
        """Publish `value` under `name`, signed with the rendezvous key."""
        signed = f"{credentials.sign(self._key, self._signed_name(name), value)}:{value}"
        try:
            self._client.key_value_set(name, signed)
        except Exception as error:  # jax raises its runtime error when the name is taken
            raise RendezvousError(
                f"could not publish {name} in the rendezvous store (another process wrote "
                f"it first?): {str(error).strip().splitlines()[0][:120]}"
            ) from None

    def _get(self, name: str) -> str:
        """The value published under `name` (waiting for it), if its signature is right."""
        try:
            signed = self._client.blocking_key_value_get(name, self._timeout_ms)
        except Exception as error:  # jax raises its runtime error on a timeout
            raise RendezvousError(
                f"nothing was published under {name} within {self._timeout_ms // 1000} s "
                f"({str(error).strip().splitlines()[0][:120]})"
            ) from None
        signature, _, value = signed.partition(":")
        if not credentials.signature_matches(self._key, self._signed_name(name), value, signature):
            raise RendezvousError(
                f"{name} in the rendezvous store is not signed with this run's key: the tasks "
                f"hold different run secrets (under SLURM: export {credentials.ENV_RUN_SECRET}"
                " before srun, or use a --run-dir every host shares), or a process outside "
                "the run wrote it"
            )
        return value

    def _signed_name(self, name: str) -> str:
        """What a signature covers besides the value: the name and this run's step, so a
        value signed for another job (a secret used again) does not count here."""
        return f"{self._context} {name}"

    def publish_shard(self, shard: int, address: ShardAddress) -> None:
        self._set(f"{KEY_ENDPOINT}/{shard}", address.endpoint)
        if address.curve_key is not None:
            self._set(f"{KEY_SERVER_CURVE}/{shard}", address.curve_key.decode())
        write_port_file(address.endpoint)

    def shard_addresses(self, shards: int, *, curve: bool) -> list[ShardAddress]:
        return [
            ShardAddress(
                self._get(f"{KEY_ENDPOINT}/{shard}"),
                self._get(f"{KEY_SERVER_CURVE}/{shard}").encode() if curve else None,
            )
            for shard in range(shards)
        ]

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        self._set(f"{KEY_BUNDLE_CURVE}{index}", public_key.decode())

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        return [self._get(f"{KEY_BUNDLE_CURVE}{index}").encode() for index in indices]

    def publish_aggregator(self, aggregator: int, endpoint: str) -> None:
        self._set(f"{KEY_AGGREGATOR}/{aggregator}", endpoint)
        write_port_file(endpoint)

    def aggregator_address(self, aggregator: int) -> str:
        return self._get(f"{KEY_AGGREGATOR}/{aggregator}")

    def exchange(self, name: str, index: int, value: str, count: int) -> list[str]:
        """Publish process `index`'s `value` under `name` and return every one of the
        `count` processes' values, in process order (waiting for them)."""
        self._set(f"{KEY_EXCHANGE}/{name}/{index}", value)
        return [self._get(f"{KEY_EXCHANGE}/{name}/{other}") for other in range(count)]

    def close(self) -> None:
        """Leave the jax.distributed group (a barrier: processes leave together).

        Called right after the rendezvous and before any JAX computation, so every process
        then starts a backend of its own: no process can take another down through jax's
        health checks, and libraries such as orbax see a single-process program.
        """
        import jax
        from jax._src import distributed

        jax.distributed.shutdown()
        # jax keeps this process's index and the group's size after the shutdown, and
        # builds the backend from them: a process other than 0 would then see a
        # multi-process program without a group (orbax's barriers fail: "cannot reshape
        # array of size 1 into shape (2,1)"). Alone from here on, it is process 0 of 1.
        distributed.global_state.process_id = 0
        distributed.global_state.num_processes = 1


class LauncherRendezvous:
    """The rendezvous of a process the local launcher restarted: its variables."""

    def publish_shard(self, shard: int, address: ShardAddress) -> None:
        write_port_file(address.endpoint)  # the same port as before; nothing else to say

    def shard_addresses(self, shards: int, *, curve: bool) -> list[ShardAddress]:
        ports = env_list(ENV_SERVER_PORT)
        if len(ports) != shards:
            raise RendezvousError("restarted bundle: a server shard never said which port it bound")
        keys = env_list(ENV_CURVE_SERVER) if curve else [""] * shards
        if len(keys) != shards:
            raise RendezvousError("restarted bundle: the launcher gave no CURVE key per shard")
        return [
            ShardAddress(f"tcp://127.0.0.1:{port}", key.encode() or None)
            for port, key in zip(ports, keys, strict=True)
        ]

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        """Nothing to do: the launcher made this key and gave it to the shards."""

    def publish_aggregator(self, aggregator: int, endpoint: str) -> None:
        write_port_file(endpoint)  # the same port as before

    def aggregator_address(self, aggregator: int) -> str:
        port = os.environ.get(ENV_AGGREGATOR_PORT)
        if not port:
            raise RendezvousError("restarted bundle: its aggregator never said which port it bound")
        return f"tcp://127.0.0.1:{port}"

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        keys = launcher_bundle_keys()
        if len(keys) != len(indices):
            raise RendezvousError("restarted shard: the launcher gave no CURVE key per bundle")
        return keys

    def close(self) -> None:
        """Nothing to leave."""


def store_context() -> str:
    """Which meeting of which run this is, for the store's signatures: the SLURM job and
    step, or the local launcher's coordinator address (a fresh port per launch)."""
    if "SLURM_JOB_ID" in os.environ and ENV_COORDINATOR not in os.environ:
        job, step = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_STEP_ID", "")
        return f"slurm job {job} step {step}"
    return f"local {os.environ.get(ENV_COORDINATOR, '')}"


def open_rendezvous(info: ProcessInfo, keys: RunKeys) -> Rendezvous:
    """The rendezvous backend for this process (after `initialize`)."""
    return LauncherRendezvous() if info.restarted else StoreRendezvous(keys.rendezvous_key)


def write_port_file(endpoint: str) -> None:
    """Tell the local launcher the port this shard bound (it restarts processes with it)."""
    path = os.environ.get(ENV_PORT_FILE)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(endpoint.rsplit(":", 1)[1])
        tmp.replace(path)


def place_roles(
    info: ProcessInfo, shards: int, keys: RunKeys, *, aggregate: bool = False
) -> Placement:
    """Every process's role (`placement.place`, with an aggregator per host when
    `aggregate`), from the hosts the processes run on: exchanged through jax.distributed's
    store at a first start under SLURM; a local run (first start or restart) is on one
    host. ValueError (one line) when no bundle is left, or a host has no bundle beside
    its aggregator."""
    if info.launcher == "slurm" and not info.restarted:
        store = StoreRendezvous(keys.rendezvous_key)
        hosts = store.exchange("host", info.index, socket.gethostname(), info.count)
    else:
        hosts = [socket.gethostname()] * info.count
    return place(hosts, shards, aggregate=aggregate)


def own_port(variable: str = ENV_SERVER_PORT) -> str:
    """The port a shard (an aggregator: `ENV_AGGREGATOR_PORT`) binds: the one it bound
    before it was restarted, or 0 (any free port, chosen by the kernel at bind: no
    probing race)."""
    return os.environ.get(variable, "0")


def launcher_bundle_keys() -> list[bytes]:
    """The bundles' CURVE public keys the local launcher gave a shard (none under SLURM):
    known before the rendezvous, so bundles are let in from their first connection."""
    return [key.encode() for key in env_list(ENV_CURVE_CLIENTS)]


def env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list (empty when unset)."""
    return [item for item in os.environ.get(name, "").split(",") if item]


def own_curve_keys() -> tuple[bytes, bytes]:
    """This process's CURVE key pair: the local launcher's (it restarts processes with the
    same keys), or a new one."""
    import zmq

    public = os.environ.get(ENV_CURVE_PUBLIC)
    secret = os.environ.get(ENV_CURVE_SECRET)
    if public and secret:
        return public.encode(), secret.encode()
    return zmq.curve_keypair()


def reachable_host(info: ProcessInfo) -> str:
    """The address a shard binds and publishes: 127.0.0.1 for local runs; under SLURM the
    address other nodes reach this one at (its name's address, or, where the name maps to
    a loopback address as Debian's hosts file does, the interface that routes to the node
    that ran srun)."""
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
