"""Process roles and rendezvous: jax.distributed initialisation and its key-value store.

Every process of a run calls `initialize()` once, before any other JAX call:
- under SLURM (`srun`), `jax.distributed.initialize()` reads the job's variables itself;
- under the local launcher, the parent passes the coordinator address, the process count
  and the index through GORILA_* environment variables, and the coordinator listens on
  127.0.0.1 only;
- otherwise the process is alone (single-process training).

Processes 0..S-1 are the parameter server's shards (`--server-shards S`, default 1), every
other process a bundle. Each shard publishes its address and run token through
jax.distributed's key-value store (and, with `--wire-security curve`, every process its
CURVE public key; secret keys never leave the process that made them); this module is the
only place that touches that (private) JAX API.
"""

from __future__ import annotations

import os
from typing import NamedTuple

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


class ProcessInfo(NamedTuple):
    """This process's place in the run."""

    index: int
    count: int
    launcher: str  # "slurm", "local" or "none"


def detect_launcher(environ: dict | None = None) -> str:
    """Who started this process: the local launcher, SLURM (srun with tasks), or nobody."""
    environ = os.environ if environ is None else environ
    if ENV_COORDINATOR in environ:
        return "local"
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return "slurm"
    return "none"


def initialize(timeout_seconds: int = 120) -> ProcessInfo:
    """Join the run's jax.distributed group (or stay alone) and say who this process is."""
    import jax

    launcher = detect_launcher()
    if launcher == "none":
        return ProcessInfo(0, 1, "none")
    # jax's preemption service replaces the process's SIGTERM handler with one that only
    # records the signal, so scancel, sbatch --signal and the local launcher's stop would
    # no longer reach launch.py's handler; the run stops through its own handler instead.
    jax.config.update("jax_enable_preemption_service", False)
    if launcher == "local":
        coordinator = os.environ[ENV_COORDINATOR]
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            initialization_timeout=timeout_seconds,
            # jax's default binds the coordinator on every interface ([::]:port).
            coordinator_bind_address=coordinator,
        )
    else:
        jax.distributed.initialize(initialization_timeout=timeout_seconds)
    # Read the index from the distributed client, not jax.process_index(): that would start
    # the XLA backend inside the group, and processes must start theirs only after leaving
    # it (see `shutdown`).
    from jax._src import distributed

    state = distributed.global_state
    return ProcessInfo(int(state.process_id), int(state.num_processes), launcher)


class KeyValueStore:
    """String keys and values shared by all processes through the jax.distributed service."""

    def __init__(self):
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("jax.distributed is not initialised: call initialize() first")
        self._client = client

    def set(self, key: str, value: str) -> None:
        """Publish `value` under `key`."""
        self._client.key_value_set(key, value)

    def get(self, key: str, timeout_seconds: float) -> str:
        """Wait up to `timeout_seconds` for `key` to be published and return its value."""
        return self._client.blocking_key_value_get(key, int(timeout_seconds * 1000))


def shutdown() -> None:
    """Leave the jax.distributed group (a barrier: processes leave together).

    Called right after the rendezvous and before any JAX computation, so every process then
    starts a backend of its own: no process can take another down through jax's health
    checks, and libraries such as orbax see a single-process program.
    """
    import jax
    from jax._src import distributed

    jax.distributed.shutdown()
    # jax keeps this process's index and the group's size after the shutdown, and builds
    # the backend from them: a process other than 0 would then see a multi-process
    # program without a group (orbax's barriers fail: "cannot reshape array of size 1
    # into shape (2,1)"). Alone from here on, it is process 0 of 1.
    distributed.global_state.process_id = 0
    distributed.global_state.num_processes = 1
