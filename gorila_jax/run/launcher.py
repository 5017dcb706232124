"""The local launcher: a whole run on one machine, started by one command with no SLURM.

`launch_local` starts the server's shards and `--workers` bundles on 127.0.0.1 (the same
script, told its place through GORILA_* variables: the jax.distributed coordinator, the
process count and index, the run secret or a bundle's credential, the CURVE keys it made),
prefixes and forwards their output, stops all of them on Ctrl-C or SIGTERM, restarts one
that dies (up to `--max-restarts`; a restarted process meets the others through
`rendezvous.LauncherRendezvous`), and when one cannot be restarted stops the others and
exits non-zero naming the process and its last error. `die_with_launcher`, called in each
child, makes every process it started stop, and be gone within
`LAUNCHER_GONE_GRACE_SECONDS` plus a poll, if the launcher itself dies (even by SIGKILL).

A sync run (`--mode sync`) has no server: the launcher starts `--workers` bundles, which
compute every step together and cannot take back one of their own; when one dies, the
others stop at once (`EXIT_LOST_PROCESS`) and the launcher starts all of them again (up to
`--max-restarts` times), in a new jax.distributed group, from the last checkpoint.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from gorila_jax.core.config import Config, ConfigError
from gorila_jax.io import logs
from gorila_jax.server.process import check_server_files, check_shard_layout
from gorila_jax.wire import credentials, rendezvous
from gorila_jax.wire.placement import Placement, place

STOP_GRACE_SECONDS = 30.0
# The others of a sync run whose process died have nothing left to finish (every step
# needs it); they stop at once by themselves, or hang in a collective of several devices.
SYNC_STOP_GRACE_SECONDS = 5.0
LAUNCHER_GONE_GRACE_SECONDS = 15.0  # a child of a dead launcher exits this long after it
LAUNCHER_POLL_SECONDS = 0.5
EXIT_STOPPED = 143  # 128 + SIGTERM: a process that stopped because it was told to
EXIT_LOST_PROCESS = 3  # a process of a sync run that stopped because another one is gone
PR_SET_PDEATHSIG = 1  # linux/prctl.h

log = logging.getLogger(__name__)


def process_name(placement: Placement, index: int) -> str:
    """How a process of the run is named in its output: "server" (or "shard k" of a split
    server), "aggregator a" or "bundle i" (a and i from 1)."""
    shard = placement.shard_of(index)
    if shard is not None:
        return "server" if len(placement.shard_processes) == 1 else f"shard {shard}"
    aggregator = placement.aggregator_of(index)
    if aggregator is not None:
        return f"aggregator {aggregator + 1}"
    return f"bundle {placement.worker_of(index) + 1}"


def die_with_launcher(launcher_pid: int, stop: threading.Event) -> None:
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


def lost_process(children: list[Child], found: Child) -> Child:
    """The child whose end ended a sync run: the first one that ended otherwise than by
    seeing another gone (`EXIT_LOST_PROCESS`), else `found`."""
    for child in children:
        if child.process.poll() not in (None, 0, EXIT_LOST_PROCESS):
            return child
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for the jax.distributed coordinator,
    whose port every process must know before any starts; the server binds its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What a native (C++) crash prints besides its message: glog's stack trace.
NATIVE_STACK_LINE = re.compile(r"^\s*(@\s+0x[0-9a-f]+|\*\*\* Check failure stack trace)")
# glog's line for a fatal error (XLA, jax.distributed): "F1203 19:38:48.05 12859 file.h:80] ...".
# Searched anywhere in a line: written from a native thread, it can land right after a
# Python line's text and before its newline ("... eta 2m05sF1203 19:38:48.05 ...").
NATIVE_FATAL_LINE = re.compile(r"F\d{4} \d\d:\d\d:[\d.]+\s+\d+ [^\]\s]+\] (?P<message>.+)")
# How many of a child's last lines (native stack frames left out) are kept to tell why it
# ended: enough that the progress and log lines its other threads print between a fatal
# status and the abort do not push the status out.
KEPT_LINES = 200


def telling_line(lines: collections.abc.Sequence[str]) -> str:
    """What a process's last output lines say of why it ended: the message of a native
    fatal error (glog's F line, its status where it gives one: jax.distributed's
    "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats)"), else
    the last line that names an error, else the last line."""
    for line in reversed(lines):
        fatal = NATIVE_FATAL_LINE.search(line.strip())
        if fatal:
            message = fatal["message"].strip()
            status = message.partition("absl::Status: ")[2]
            return f"fatal error: {(status or message).rstrip(':')}"
    for line in reversed(lines):
        lowered = line.lower()
        if "error" in lowered or "exception" in lowered or "killed" in lowered:
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


class Child:
    """One started process: its name, its output forwarded with a prefix, its last lines."""

    def __init__(self, name: str, command: list[str], environ: dict):
        self.name = name
        self.last_lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
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
            if line.strip() and not NATIVE_STACK_LINE.match(line):
                self.last_lines.append(line)
            tag = f"[{self.name}]"
            # Relayed, not logged: the child's own lines (its progress, its log records).
            sys.stdout.write(f"{line if line.startswith(tag) else f'{tag} {line}'}\n")
            sys.stdout.flush()

    def last_error(self) -> str:
        """The most telling of its last lines (`telling_line`)."""
        return telling_line(self.last_lines)

    def finish_output(self) -> None:
        """Wait for the output reader to drain."""
        self._reader.join(timeout=5)


def _launcher_curve_keys(count: int, shards: int) -> dict[int, dict[str, str]]:
    """The CURVE environment of each process index: its key pair, and every server shard's
    public key (bundles) or every bundle's (shards). Made once, so restarts reuse them."""
    pairs = [tuple(key.decode() for key in zmq.curve_keypair()) for _ in range(count)]
    shard_keys = ",".join(pair[0] for pair in pairs[:shards])
    bundle_keys = ",".join(pair[0] for pair in pairs[shards:])
    environs = {}
    for index, (public, secret) in enumerate(pairs):
        own = {rendezvous.ENV_CURVE_PUBLIC: public, rendezvous.ENV_CURVE_SECRET: secret}
        if index < shards:
            own[rendezvous.ENV_CURVE_CLIENTS] = bundle_keys
        else:
            own[rendezvous.ENV_CURVE_SERVER] = shard_keys
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
    logs.setup("launcher")
    sync = config.mode == "sync"
    shards = 0 if sync else config.server_shards
    if shards > 1:
        check_shard_layout(config)  # before starting anything
    if not sync:
        check_server_files(Path(config.run_dir), shards)
    if config.max_bundles and config.max_bundles < config.workers:
        raise ConfigError(
            f"config.max_bundles: must be at least the {config.workers} bundles started "
            f"(--workers), got {config.max_bundles}"
        )
    aggregate = config.aggregate_per_host
    count = config.workers + shards + int(aggregate)
    # One host: processes 0..S-1 serve, then the aggregator (process S) where there is one.
    placement = place(["127.0.0.1"] * count, shards, aggregate=aggregate)
    private = Path(tempfile.mkdtemp(prefix="gorila-launcher-"))
    port_files = [private / f"server_port.{shard}" for shard in range(shards)]
    aggregator_port_file = private / "aggregator_port"
    environ = dict(os.environ)
    environ[rendezvous.ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
    environ[rendezvous.ENV_NUM_PROCESSES] = str(count)
    # The shards get the run secret, each bundle its own credential only, every process
    # the key that signs the rendezvous (gorila_jax.wire.credentials); nothing inherited.
    secret = credentials.new_run_secret()
    environ[rendezvous.ENV_RENDEZVOUS_KEY] = credentials.rendezvous_key(secret)
    environ.pop(credentials.ENV_RUN_SECRET, None)
    environ.pop(credentials.ENV_WORKER_CREDENTIAL, None)
    environ[rendezvous.ENV_LAUNCHER_PID] = str(os.getpid())
    environ.pop(rendezvous.ENV_SERVER_PORT, None)
    environ.pop(rendezvous.ENV_AGGREGATOR_PORT, None)
    environ.pop(rendezvous.ENV_PORT_FILE, None)
    environ["PYTHONUNBUFFERED"] = "1"
    curve = config.wire_security == "curve" and not sync
    curve_keys = _launcher_curve_keys(count, shards) if curve else {}
    command = [sys.executable, os.path.abspath(sys.argv[0]), *argv]
    servers = "1 parameter server" if shards == 1 else f"a parameter server in {shards} shards"
    if sync:
        servers = "sync mode, no server"
    if aggregate:
        servers += " + 1 aggregator"
    log.info(
        f"local run: {servers} + {config.workers} bundle(s) on 127.0.0.1, run dir {config.run_dir}"
    )
    interrupted = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        interrupted.set()

    def start(index: int, restarted: bool) -> Child:
        child_environ = {
            **environ,
            rendezvous.ENV_PROCESS_ID: str(index),
            **curve_keys.get(index, {}),
        }
        is_aggregator = placement.aggregator_of(index) is not None
        if index < shards:
            child_environ[rendezvous.ENV_PORT_FILE] = str(port_files[index])
        if is_aggregator:
            child_environ[rendezvous.ENV_PORT_FILE] = str(aggregator_port_file)
        if curve or sync:  # a process's CURVE key is its identity; a sync run has no server
            pass
        elif index < shards or is_aggregator:  # an aggregator checks its bundles' credentials
            child_environ[credentials.ENV_RUN_SECRET] = secret
        else:
            worker = placement.worker_of(index)
            child_environ[credentials.ENV_WORKER_CREDENTIAL] = credentials.worker_credential(
                secret, worker
            )
        if restarted:
            child_environ[rendezvous.ENV_RESTARTED] = "1"
            # A shard takes back its own port; a bundle gets every shard's.
            mine = port_files[index : index + 1] if index < shards else port_files
            ports = [path.read_text() for path in mine if path.exists()]
            if len(ports) == len(mine):
                child_environ[rendezvous.ENV_SERVER_PORT] = ",".join(ports)
            # An aggregator takes back its own port; its bundles get it.
            if aggregate and index >= shards and aggregator_port_file.exists():
                child_environ[rendezvous.ENV_AGGREGATOR_PORT] = aggregator_port_file.read_text()
        return Child(process_name(placement, index), command, child_environ)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    restarts = [0] * count
    sync_restarts = 0
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
                if sync and code != 2 and sync_restarts < config.max_restarts:
                    sync_restarts += 1
                    gone = lost_process(children, child)
                    gone.finish_output()
                    reason = gone.last_error()
                    if "stopped sending heartbeats" in reason:
                        reason += (
                            " (processes that did not run for more than jax.distributed's "
                            f"{rendezvous.SYNC_HEARTBEAT_SECONDS} s heartbeat timeout: the run "
                            "suspended or stopped, or a process gone)"
                        )
                    log.warning(
                        f"{gone.name} (pid {gone.process.pid}) died with status "
                        f"{gone.process.poll()}: {reason}; restarting every process "
                        f"of the sync run from its last checkpoint "
                        f"({sync_restarts}/{config.max_restarts})"
                    )
                    stop_children(children, grace=SYNC_STOP_GRACE_SECONDS)
                    environ[rendezvous.ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
                    children = [start(index, restarted=False) for index in range(count)]
                    break
                if not sync and code != 2 and restarts[index] < config.max_restarts:
                    restarts[index] += 1
                    log.warning(
                        f"{child.name} (pid {child.process.pid}) died with status "
                        f"{code}: {child.last_error()}; restarting it "
                        f"({restarts[index]}/{config.max_restarts})"
                    )
                    children[index] = start(index, restarted=True)
                    continue
                gone = lost_process(children, child) if sync else child
                stop_children(
                    children, grace=SYNC_STOP_GRACE_SECONDS if sync else STOP_GRACE_SECONDS
                )
                log.error(
                    f"{gone.name} (pid {gone.process.pid}) exited with status "
                    f"{gone.process.poll()}: {gone.last_error()}"
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
