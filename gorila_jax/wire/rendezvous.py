"""How the processes of a run find each other: who they are, and where the server's shards
listen.

Every process of a run calls `initialize()` once, before any other JAX call:
- under SLURM (`srun`), `jax.distributed.initialize()` reads the job's variables itself;
- under the local launcher, the parent passes the coordinator address, the process count
  and the index through GORILA_* environment variables, and the coordinator listens on
  127.0.0.1 only;
- otherwise the process is alone (single-process training).

Processes 0..S-1 are the parameter server's shards (`--server-shards S`, default 1), every
other process a bundle. The roles then meet through one interface, `Rendezvous`: a shard
publishes its `ShardAddress` (endpoint, run token, CURVE public key) and reads the bundles'
CURVE keys; a bundle publishes its CURVE key and reads every shard's address. Secret keys
never leave the process that made them. Two backends implement it:

- `StoreRendezvous`: jax.distributed's key-value store, for every first start (under SLURM
  and the local launcher alike); `close` leaves the group, so processes live and die
  independently afterwards. This module is the only place that touches that (private)
  JAX API.
- `LauncherRendezvous`: a process the local launcher restarts cannot rejoin
  jax.distributed (the group was left after the first rendezvous); it reads what it needs
  from the launcher's variables instead: its index, the ports the shards bound first (each
  shard writes its port into a file the launcher names), the token and the CURVE keys the
  launcher made for every process.

`open_rendezvous` picks the backend, so the roles have no "restarted" branch of their own.

A sync run (`--mode sync`) has no server: its processes stay in the jax.distributed group
for the whole run and compute together (`initialize(collectives=True)`); they meet only
through `StoreRendezvous.exchange`, to compare what each starts from.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from gorila_jax.wire.placement import Placement, place

ENV_COORDINATOR = "GORILA_COORDINATOR"
ENV_NUM_PROCESSES = "GORILA_NUM_PROCESSES"
ENV_PROCESS_ID = "GORILA_PROCESS_ID"
# A restarted process of the local launcher: the port a server shard bound before (its
# own), or every shard's, comma-separated (a bundle).
ENV_SERVER_PORT = "GORILA_SERVER_PORT"
ENV_RUN_TOKEN = "GORILA_RUN_TOKEN"
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
KEY_TOKEN = "gorila/run_token"  # + "/k": server shard k's run token
KEY_SERVER_CURVE = "gorila/curve/server"  # + "/k": server shard k's CURVE public key
KEY_BUNDLE_CURVE = "gorila/curve/bundle"  # + the process index: a bundle's public key
KEY_EXCHANGE = "gorila/exchange"  # + "/<name>/i": what process i gave `exchange(name, ...)`
KEY_VALUE_TIMEOUT_SECONDS = 120.0
# A sync run's processes meet at every learner step: one that stops answering (hung, not
# dead: a dead one fails the others' next step at once, where each process has one device)
# makes jax's coordination service end the others after this long.
SYNC_HEARTBEAT_SECONDS = 30


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
    token: str
    curve_key: bytes | None  # the shard's CURVE public key (with --wire-security curve)


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
        jax.distributed.initialize(initialization_timeout=timeout_seconds, **options)
    # Read the index from the distributed client, not jax.process_index(): that would start
    # the XLA backend inside the group, and processes must start theirs only after leaving
    # it (see `StoreRendezvous.close`).
    from jax._src import distributed

    state = distributed.global_state
    return ProcessInfo(int(state.process_id), int(state.num_processes), launcher)


class Rendezvous(Protocol):
    """Where the shards publish their addresses and the bundles their CURVE keys."""

    def publish_shard(self, shard: int, address: ShardAddress) -> None:
        """Make shard `shard`'s address known to the bundles."""

    def shard_addresses(self, shards: int, *, curve: bool) -> list[ShardAddress]:
        """Every shard's address (waiting for them); CURVE keys when `curve`."""

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        """Make the CURVE public key of the bundle of process `index` known."""

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        """The CURVE public keys of the bundles of processes `indices` (waiting for them)."""

    def close(self) -> None:
        """Done meeting: from here on, this process lives and dies on its own."""


class StoreRendezvous:
    """The rendezvous through jax.distributed's key-value store (a first start).

    Under the local launcher a shard also writes the port it bound into the launcher's
    port file, so that the launcher can restart processes with it (`LauncherRendezvous`).
    """

    def __init__(self, timeout_seconds: float = KEY_VALUE_TIMEOUT_SECONDS):
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RendezvousError("jax.distributed is not initialised: call initialize() first")
        self._client = client
        self._timeout_ms = int(timeout_seconds * 1000)

    def _set(self, key: str, value: str) -> None:
        self._client.key_value_set(key, value)

    def _get(self, key: str) -> str:
        return self._client.blocking_key_value_get(key, self._timeout_ms)

    def publish_shard(self, shard: int, address: ShardAddress) -> None:
        self._set(f"{KEY_ENDPOINT}/{shard}", address.endpoint)
        self._set(f"{KEY_TOKEN}/{shard}", address.token)
        if address.curve_key is not None:
            self._set(f"{KEY_SERVER_CURVE}/{shard}", address.curve_key.decode())
        write_port_file(address.endpoint)

    def shard_addresses(self, shards: int, *, curve: bool) -> list[ShardAddress]:
        return [
            ShardAddress(
                self._get(f"{KEY_ENDPOINT}/{shard}"),
                self._get(f"{KEY_TOKEN}/{shard}"),
                self._get(f"{KEY_SERVER_CURVE}/{shard}").encode() if curve else None,
            )
            for shard in range(shards)
        ]

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        self._set(f"{KEY_BUNDLE_CURVE}{index}", public_key.decode())

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        return [self._get(f"{KEY_BUNDLE_CURVE}{index}").encode() for index in indices]

    def exchange(self, name: str, index: int, value: str, count: int) -> list[str]:
        """Publish process `index`'s `value` under `name` and return every one of the
        `count` processes' values, in process order (waiting for them)."""
        self._set(f"{KEY_EXCHANGE}/{name}/{index}", value)
        values = []
        for other in range(count):
            try:
                values.append(self._get(f"{KEY_EXCHANGE}/{name}/{other}"))
            except Exception as error:  # jax raises its runtime error on a timeout
                raise RendezvousError(
                    f"process {other} gave no {name} within {self._timeout_ms // 1000} s "
                    f"({str(error).strip().splitlines()[0][:120]})"
                ) from None
        return values

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
            ShardAddress(f"tcp://127.0.0.1:{port}", os.environ[ENV_RUN_TOKEN], key.encode() or None)
            for port, key in zip(ports, keys, strict=True)
        ]

    def publish_bundle_key(self, index: int, public_key: bytes) -> None:
        """Nothing to do: the launcher made this key and gave it to the shards."""

    def bundle_keys(self, indices: Sequence[int]) -> list[bytes]:
        keys = launcher_bundle_keys()
        if len(keys) != len(indices):
            raise RendezvousError("restarted shard: the launcher gave no CURVE key per bundle")
        return keys

    def close(self) -> None:
        """Nothing to leave."""


def open_rendezvous(info: ProcessInfo) -> Rendezvous:
    """The rendezvous backend for this process (after `initialize`)."""
    return LauncherRendezvous() if info.restarted else StoreRendezvous()


def write_port_file(endpoint: str) -> None:
    """Tell the local launcher the port this shard bound (it restarts processes with it)."""
    path = os.environ.get(ENV_PORT_FILE)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(endpoint.rsplit(":", 1)[1])
        tmp.replace(path)


def place_roles(info: ProcessInfo, shards: int) -> Placement:
    """Every process's role (`placement.place`), from the hosts the processes run on:
    exchanged through jax.distributed's store at a first start under SLURM; a local run
    (first start or restart) is on one host. ValueError when no bundle is left."""
    if info.launcher == "slurm" and not info.restarted:
        hosts = StoreRendezvous().exchange("host", info.index, socket.gethostname(), info.count)
    else:
        hosts = [socket.gethostname()] * info.count
    return place(hosts, shards)


def run_token() -> str:
    """The run's token: the local launcher's (every process of the run shares it, restarts
    too), or, under SLURM, a new one that each shard publishes with its address."""
    from gorila_jax.wire import transport

    return os.environ.get(ENV_RUN_TOKEN) or transport.new_run_token()


def own_port() -> str:
    """The port a shard binds: the one it bound before it was restarted, or 0 (any free
    port, chosen by the kernel at bind: no probing race)."""
    return os.environ.get(ENV_SERVER_PORT, "0")


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
