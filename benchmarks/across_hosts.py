"""Benchmark: Nature-CNN pushes and pulls per second between two hosts, next to loopback.

The Nature CNN of Pong (`Config()` defaults: 1,687,206 params, a 6.75 MB message each way)
with Adam. A `ParameterServer` process serves it (`serve`, as a server does) and a client
process (`ServerConnection`, as a bundle's thread uses it) measures, one after the other:
`--pushes` pushes of a precomputed gradient with `PUSHES_IN_FLIGHT` unacknowledged (as a
bundle pushes: each names the version of its latest ack), then as many pulls of the full
params, one at a time (as a bundle pulls; `send_pull(-1)`: always the whole vector). The
same server process answers a raw pyzmq ROUTER on a second port: the client repeats both
with the same bytes through a bare DEALER (a push answered by 3 bytes, a pull by the
params' bytes; no header, no decode, no apply), what zmq and the link alone allow. The
parent makes the run secret and gives it to both roles in the environment: the server
checks each request's credential with it, a client derives its own worker's credential.

Two pairs of processes: one on loopback in this (root) namespace, and one across the
simulated cluster of `.ci/cluster.sh` (needs root): the server inside host h1, bound to
198.18.0.11, the client inside host h2, both links limited to `--rate` (tc tbf on each
host's link, both directions; `none`: no limit). A cluster already up with the same rate is
used and left up; otherwise one is brought up and taken down at the end, whatever happens.
Each server is started once; `--repeats` fresh client processes run against each,
alternating loopback and hosts. Figures are the medians of the runs.

Floors: for loopback, the raw zmq rate of the same bytes measured in the same run; across
hosts, the tighter of the link's bound (rate / 8 / bytes per message: the most messages
per second the link carries, TCP/IP framing not counted, so about 0.95 of it is the
practical top) and the loopback figure of the same run. The ratios are value/floor, higher
is better. On a machine whose "hosts" share the same cores, a link faster than the CPUs
can feed leaves the CPU as the bound: then the loopback floor binds.

    python benchmarks/across_hosts.py [--rate 1gbit] [--pushes 100] [--repeats 3]
    python benchmarks/across_hosts.py --loopback-only       # no cluster (no root needed)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, result_line

from gorila_jax.core import cli

CLUSTER = ROOT / ".ci" / "cluster.sh"
SERVER_HOST, CLIENT_HOST, SERVER_ADDRESS = "h1", "h2", "198.18.0.11"
BRIDGE_NAMESPACE = "gorila-br"
SECRET_VARIABLE = "GORILA_ACROSS_HOSTS_SECRET"  # the run secret, from the parent
READY, RESULT = "ACROSS_HOSTS_READY ", "ACROSS_HOSTS_RESULT "
TIMEOUT_SECONDS = 60.0  # the client's wait for any one reply
STARTUP_SECONDS = 300.0  # a server's start (JAX, the model, the apply compiled)
SECONDS_PER_MESSAGE = 2.0  # the most a client run may take per message, to time it out
MEAN_ABS_TD = 1.0  # each push's mean |TD error| (the outlier filter's input)
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


@dataclasses.dataclass(frozen=True)
class AcrossHostsArgs:
    """Nature-CNN push and pull rates between two simulated hosts, next to loopback."""

    rate: str = "1gbit"
    """each host link's rate limit (tc units: 10gbit, 1gbit, 100mbit...), or none"""
    pushes: int = 100
    """pushes timed per run, and as many pulls"""
    warmup: int = 5
    """untimed pushes and pulls before them"""
    repeats: int = 3
    """client runs per pair of hosts (fresh processes; medians)"""
    loopback_only: bool = False
    """measure loopback alone (no cluster, no root)"""


def rate_bits(rate: str) -> float:
    """Bits per second of a rate as tc writes it (`1Gbit`, `100Mbit`, `1.5Gbit`)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]*bit)", rate.lower())
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"not a rate: {rate!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def wanted_rate(rate: str) -> float | None:
    """`--rate` in bits per second (None for `none`), in the units cluster.sh takes."""
    if rate == "none":
        return None
    if not re.fullmatch(r"[1-9][0-9]*(bit|kbit|mbit|gbit)", rate):
        raise cli.CommandLineError(f"--rate {rate}: a rate like 10gbit, 1gbit, 100mbit, or none")
    return rate_bits(rate)


# ---- the two roles, each its own process --------------------------------------------------


def serve_role(spec: dict) -> None:
    """The server: a ParameterServer on `spec["bind"]` for `spec["workers"]` clients, one
    after the other, and a raw ROUTER beside it; prints READY with what clients need, then
    serves until every client has said stop, or until its stdin closes."""
    import jax
    import numpy as np
    import zmq

    from gorila_jax.core.config import Config
    from gorila_jax.envs import model_of
    from gorila_jax.server.parameter_server import ParameterServer, max_message_bytes
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import WorkerAuthority

    config = Config()
    params = jax.tree.map(np.asarray, model_of(config).init(config.seed))
    secret = os.environ[SECRET_VARIABLE]
    authority = WorkerAuthority(spec["workers"], secret=secret)
    server = ParameterServer(config, params, num_workers=spec["workers"], authority=authority)
    server.warm_up()  # the apply compiled for every batch size before any push
    jax.block_until_ready(server.params)
    reply = server.host_params().copy()
    max_bytes = max_message_bytes(config, server.total_params)
    context = zmq.Context.instance()
    socket, endpoint = transport.make_server_socket(context, spec["bind"], max_bytes)
    raw, raw_endpoint = transport.make_server_socket(context, spec["bind"], max_bytes)
    closed = threading.Event()

    def watch_stdin() -> None:  # the parent gone or done: stop
        sys.stdin.buffer.read()
        closed.set()

    def answer_raw() -> None:
        poller = zmq.Poller()
        poller.register(raw, zmq.POLLIN)
        while not closed.is_set():
            if poller.poll(timeout=100):
                peer, frame = raw.recv_multipart(copy=False)
                pull = frame.buffer.nbytes == 4 and frame.bytes == b"pull"
                answer = reply if pull else b"ack"
                raw.send_multipart([peer, answer], copy=False)

    threading.Thread(target=watch_stdin, daemon=True).start()
    threading.Thread(target=answer_raw, daemon=True).start()
    ready = {
        "endpoint": endpoint,
        "raw_endpoint": raw_endpoint,
        "fingerprint": server.fingerprint,
        "num_params": server.num_params,
        "max_bytes": max_bytes,
        "push_bytes": push_bytes(secret, server.fingerprint, server.num_params),
    }
    print(READY + json.dumps(ready), flush=True)
    try:
        server.serve(socket, endpoint, closed.is_set)
    finally:
        closed.set()
        socket.close(linger=0)
        raw.close(linger=0)
    refused = dict(server.counters.rejections)
    print(f"server: {server.version} updates, refusals {refused or 'none'}", file=sys.stderr)


def push_bytes(secret: str, fingerprint: str, num_params: int) -> int:
    """Bytes of one push as encoded (header, with worker 1's credential, + gradient frame);
    a pull's reply is within a few bytes of it."""
    import numpy as np

    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import worker_credential

    header = transport.make_header(
        "push", credential=worker_credential(secret, 1), worker=1, seq=time.time_ns(),
        version=123_456, fingerprint=fingerprint, mean_abs_td=MEAN_ABS_TD, frames=0,
    )  # fmt: skip
    frames = transport.encode(header, [np.zeros(num_params, np.float32)])
    return sum(memoryview(frame).nbytes for frame in frames)


def client_role(spec: dict) -> None:
    """A client: pushes with a bundle's window, pulls one at a time, through the server and
    through the raw socket; prints RESULT with the seconds of each, then says stop."""
    from collections import deque

    import numpy as np
    import zmq

    from gorila_jax.bundle.client import PUSHES_IN_FLIGHT, ServerConnection
    from gorila_jax.wire.credentials import worker_credential

    num_params, count, warmup = spec["num_params"], spec["pushes"], spec["warmup"]
    grads = (1e-3 * np.random.default_rng(spec["worker"]).standard_normal(num_params)).astype(
        np.float32
    )
    connection = ServerConnection(
        spec["endpoint"],
        credential=worker_credential(os.environ[SECRET_VARIABLE], spec["worker"]),
        worker=spec["worker"],
        fingerprint=spec["fingerprint"],
        num_params=num_params,
        max_bytes=spec["max_bytes"],
        timeout_seconds=TIMEOUT_SECONDS,
    )
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(spec["raw_endpoint"])
    try:
        version = connection.hello()[1]
        refused = 0

        def server_pushes(n: int) -> None:
            nonlocal version, refused
            in_flight: deque[int] = deque()
            for sent in range(n + PUSHES_IN_FLIGHT - 1):  # the last ones only collected
                if sent < n:
                    in_flight.append(
                        connection.send_push(
                            grads, base_version=version, mean_abs_td=MEAN_ABS_TD, frames=0
                        )
                    )
                if len(in_flight) == PUSHES_IN_FLIGHT or sent >= n:
                    accepted, _, acked = connection.receive_ack(in_flight.popleft())
                    version = max(version, acked)
                    refused += not accepted

        def server_pulls(n: int) -> None:
            nonlocal version
            for _ in range(n):
                params, version = connection.receive_pulled(connection.send_pull(-1))
                assert params is not None and params.size == num_params

        def raw_pushes(n: int) -> None:
            waiting = 0
            for sent in range(n + PUSHES_IN_FLIGHT - 1):
                if sent < n:
                    raw.send(grads, copy=False)
                    waiting += 1
                if waiting == PUSHES_IN_FLIGHT or sent >= n:
                    raw.recv(copy=False)
                    waiting -= 1

        def raw_pulls(n: int) -> None:
            for _ in range(n):
                raw.send(b"pull")
                assert len(raw.recv(copy=False)) == 4 * num_params

        seconds = {}
        for name, run in (
            ("push", server_pushes),
            ("pull", server_pulls),
            ("raw_push", raw_pushes),
            ("raw_pull", raw_pulls),
        ):
            run(warmup)
            start = time.perf_counter()
            run(count)
            seconds[name] = time.perf_counter() - start
        print(RESULT + json.dumps({"seconds": seconds, "refused": refused}), flush=True)
        connection.stop()
    finally:
        raw.close(linger=0)
        connection.close()


# ---- the parent: processes, the cluster, the figures --------------------------------------


def role_command(prefix: list[str], role: str, spec: dict) -> list[str]:
    return [*prefix, sys.executable, str(Path(__file__).resolve()), role, json.dumps(spec)]


class Server:
    """A server role process (under `prefix`, e.g. `cluster.sh exec h1`), its READY line."""

    def __init__(self, name: str, prefix: list[str], bind: str, workers: int, env: dict):
        self.name = name
        # Its stderr, for the message when it fails; closed by `close`.
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            role_command(prefix, "_serve", {"bind": bind, "workers": workers}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info: dict | None = None

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ready(self) -> dict:
        deadline = time.monotonic() + STARTUP_SECONDS
        while self.info is None:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"{self.name} server: not ready in {STARTUP_SECONDS:.0f}s:\n{self.tail()}"
                ) from None
            if line is None:
                raise RuntimeError(f"{self.name} server exited early:\n{self.tail()}")
            if line.startswith(READY):
                self.info = json.loads(line[len(READY) :])
        return self.info

    def tail(self, lines: int = 15) -> str:
        self.stderr.seek(0)
        return "".join(self.stderr.readlines()[-lines:])

    def close(self) -> None:
        """Close its stdin (it stops), wait, and kill it if it does not."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.stderr.close()


def run_client(server: Server, prefix: list[str], worker: int, args, env: dict) -> dict:
    spec = {**server.ready(), "worker": worker, "pushes": args.pushes, "warmup": args.warmup}
    spec.pop("push_bytes")
    done = subprocess.run(
        role_command(prefix, "_client", spec),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=STARTUP_SECONDS + 4 * (args.pushes + args.warmup) * SECONDS_PER_MESSAGE,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError(
        f"{server.name} client (worker {worker}) failed, exit {done.returncode}:\n"
        f"{done.stderr[-3000:]}\nserver:\n{server.tail()}"
    )


def cluster(*words: str, rate: str | None = None, check: bool = True):
    env = {**os.environ, "GORILA_CLUSTER_HOSTS": "2"}
    env.pop("GORILA_CLUSTER_RATE", None)
    if rate is not None:
        env["GORILA_CLUSTER_RATE"] = rate
    return subprocess.run(
        ["bash", str(CLUSTER), *words], capture_output=True, text=True, env=env, check=check
    )


def cluster_rate() -> float | None:
    """The tbf rate (bits/s) on the cluster's links now, None when they are not limited."""
    shown = subprocess.run(
        ["tc", "-n", BRIDGE_NAMESPACE, "qdisc", "show"], capture_output=True, text=True
    ).stdout
    rates = {rate_bits(m) for m in re.findall(r"\btbf\b.*?\brate (\S+)", shown)}
    if len(rates) > 1:
        raise RuntimeError(f"the cluster's links have different rates: {sorted(rates)}")
    return rates.pop() if rates else None


def bring_up(rate: str, wanted: float | None) -> bool:
    """Make sure a 2-host cluster with links at `wanted` is up; True if this call made it."""
    if cluster("status", check=False).returncode == 0:
        have = cluster_rate()
        if have != wanted:
            shown = "no limit" if have is None else f"{have / 1e9:g} Gbit/s"
            raise cli.CommandLineError(
                f"a cluster is up with links at {shown}, not --rate {rate}: bring it down "
                f"first (bash .ci/cluster.sh down) if nobody is using it"
            )
        print(f"cluster: already up with --rate {rate}; using it and leaving it up")
        return False
    checked = cluster("check", check=False)
    if checked.returncode != 0:
        raise cli.CommandLineError(
            f"{checked.stdout.strip()} (--loopback-only measures loopback alone)"
        )
    print(f"cluster: bringing 2 hosts up, links {'unlimited' if wanted is None else rate}")
    try:
        cluster("up", rate=None if wanted is None else rate)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"cluster.sh up failed:\n{error.stdout}{error.stderr}") from None
    return True


def benchmark(args: AcrossHostsArgs) -> int:
    wanted = wanted_rate(args.rate)
    if args.pushes < 1 or args.repeats < 1 or args.warmup < 0:
        raise cli.CommandLineError("--pushes and --repeats must be positive, --warmup >= 0")
    from gorila_jax.wire.credentials import new_run_secret

    env = {**os.environ, SECRET_VARIABLE: new_run_secret()}
    here = ["loopback"] if args.loopback_only else ["loopback", "hosts"]
    made = False
    servers: dict[str, Server] = {}
    runs: dict[str, list[dict]] = {name: [] for name in here}
    # SIGTERM ends the run like Ctrl-C: the finally below stops the servers and the cluster.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if not args.loopback_only:
            made = bring_up(args.rate, wanted)
        prefixes = {
            "loopback": ([], []),
            "hosts": (
                ["bash", str(CLUSTER), "exec", SERVER_HOST],
                ["bash", str(CLUSTER), "exec", CLIENT_HOST],
            ),
        }
        binds = {"loopback": "tcp://127.0.0.1:0", "hosts": f"tcp://{SERVER_ADDRESS}:0"}
        for name in here:
            servers[name] = Server(name, prefixes[name][0], binds[name], args.repeats, env)
        for name in here:
            servers[name].ready()
        for worker in range(args.repeats):
            for name in here:
                result = run_client(servers[name], prefixes[name][1], worker, args, env)
                runs[name].append(result)
                print(f"run {worker + 1} {name}: " + describe(result, args.pushes), flush=True)
        info = servers["loopback"].ready()
    finally:
        for server in servers.values():
            server.close()
        if made:
            down = cluster("down", check=False)
            print("cluster: taken down" if down.returncode == 0 else down.stderr.strip())
        signal.signal(signal.SIGTERM, previous)
    report(args, info, runs, wanted)
    return 0


def describe(result: dict, pushes: int) -> str:
    rates = {kind: pushes / s for kind, s in result["seconds"].items()}
    return (
        f"push {rates['push']:.1f}/s (raw {rates['raw_push']:.1f}), "
        f"pull {rates['pull']:.1f}/s (raw {rates['raw_pull']:.1f}), "
        f"refused {result['refused']}"
    )


def report(args, info: dict, runs: dict[str, list[dict]], wanted: float | None) -> None:
    message = info["push_bytes"]
    mb = 1e6
    medians = {
        name: {
            kind: statistics.median(args.pushes / r["seconds"][kind] for r in results)
            for kind in ("push", "pull", "raw_push", "raw_pull")
        }
        for name, results in runs.items()
    }
    link = None if wanted is None else wanted / 8 / message
    print(
        f"\nmodel: Nature CNN (Pong), {info['num_params']:,} params, {message:,} bytes per "
        f"push ({message / mb:.2f} MB; a pull's reply the same within a few bytes); "
        f"{args.pushes} pushes ({2} in flight) then {args.pushes} pulls (one at a time) per "
        f"run, medians of {args.repeats} run(s); {os.cpu_count()} cores shared by every "
        f"process"
    )
    if "hosts" in runs:
        limit = "no limit" if wanted is None else f"{args.rate} ({wanted / 1e9:g} Gbit/s)"
        bound = "" if link is None else f": at most {link:.1f} messages/s each way"
        print(f"hosts: server in {SERVER_HOST} ({SERVER_ADDRESS}), client in {CLIENT_HOST}, "
              f"links {limit}{bound}")  # fmt: skip
    print(f"{'pair':<9} {'kind':<5} {'per s':>8} {'MB/s':>8} {'raw zmq /s':>11}  runs (per s)")
    for name, results in runs.items():
        for kind in ("push", "pull"):
            each = ", ".join(f"{args.pushes / r['seconds'][kind]:.1f}" for r in results)
            value = medians[name][kind]
            print(
                f"{name:<9} {kind:<5} {value:>8.1f} {value * message / mb:>8.1f} "
                f"{medians[name]['raw_' + kind]:>11.1f}  {each}"
            )
    label = "hosts_unlimited" if wanted is None else f"hosts_{args.rate.lower()}"
    for kind in ("push", "pull"):
        loopback = medians["loopback"][kind]
        print(f"\n{kind}_per_s_loopback: floor the raw zmq rate of the same bytes on loopback")
        print(result_line(f"{kind}_per_s_loopback", loopback, medians["loopback"]["raw_" + kind]))
        if "hosts" not in runs:
            continue
        floor, which = loopback, "the loopback figure"
        if link is not None and link < loopback:
            floor, which = link, f"the link's bound ({args.rate} / 8 / {message:,} B)"
        print(
            f"{kind}_per_s_{label}: floor {which}; link bound "
            f"{'none' if link is None else f'{link:.1f}'}, loopback {loopback:.1f}"
        )
        print(result_line(f"{kind}_per_s_{label}", medians["hosts"][kind], floor))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] in ("_serve", "_client"):  # a role, started by the parent
        (serve_role if argv[0] == "_serve" else client_role)(json.loads(argv[1]))
        return 0
    return cli.run(benchmark, AcrossHostsArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
