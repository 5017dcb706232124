"""Benchmark: one server shard under 100 simulated bundles, its CPU per push at saturation.

Gorila's scale is many bundles against one shard's slice: every bundle's push reaches every
shard, so what a shard pays per push whatever its slice (the fixed cost) bounds how many
bundles any number of shards can serve (BENCHMARKS.md, "Sharded server: a model").

The shard: shard 0 of a Pong server split 256 ways (`Config()` defaults, a 6,591-element
slice of the Nature CNN), the real `ParameterServer` and `serve` on a loopback socket in a
spawned process (`sharded_server.shard_process`: the outlier filter off and no staleness
bound, as there). The bundles: `--bundles` DEALER sockets, each with its own worker id,
multiplexed in `--client-processes` spawned processes, each request signed with its
worker's credential (the shard holds the run secret); no learner: each says hello, then
pushes a precomputed random slice at `--rates` pushes per second (0: as fast as its window
of `--window` unacknowledged pushes allows), naming as base version its latest ack's, and
pulls every `--sync-every` pushes, as a bundle does. Offered load rises phase by phase.

Measured per phase, over `--seconds` after `--warmup`: the pushes the shard absorbed per
second (its version), its process CPU per push (user + sys of every thread: zmq's I/O
thread, XLA's, the serve loop), and the ack latency p50 / p99 seen by the bundles.

The floor, same run, same bundles: a raw pyzmq ROUTER (`raw_router`) that receives the
same messages and answers each push with the same ack bytes (and each pull with the same
params reply), nothing else: the CPU per message of zmq and Python's bare loop.

    python benchmarks/many_bundles.py [--bundles 100] [--client-processes 2]
        [--rates 5 10 20 0] [--seconds 5] [--warmup 1.5]

It ends with `RESULT push_fixed_cost value=<ms of shard CPU per push, unbounded phase>
floor=<ms of CPU per message of the raw ROUTER, unbounded phase> ratio=<value/floor>`
(goals: value <= 0.05 ms, ratio <= 3). On this 2-core machine the shard, the floor's
router and the client processes share the cores: absorb rates are bounded by that, CPU per
push is not.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import sys
import time

import msgpack
import numpy as np
from common import result_line
from sharded_server import Collector, _config, shard_process

from gorila_jax.core import cli
from gorila_jax.wire import transport

SHARDS = 256  # the split whose shard 0 is measured: a 6,591-element slice
STARTUP_SECONDS = 300.0


@dataclasses.dataclass(frozen=True)
class ManyBundlesArgs:
    """One server shard under many simulated bundles: CPU per push at saturation."""

    bundles: int = 100
    """simulated bundles (DEALER sockets, each its own worker)"""
    client_processes: int = 2
    """processes the bundles are multiplexed in"""
    rates: tuple[float, ...] = (5.0, 10.0, 20.0, 0.0)
    """offered pushes per second per bundle, one phase each (0: as fast as the window allows)"""
    window: int = 2
    """unacknowledged pushes per bundle"""
    sync_every: int = 4
    """a pull every this many pushes"""
    seconds: float = 5.0
    """timed window per phase"""
    warmup: float = 1.5
    """seconds of load before it"""


def raw_router(num_workers: int, slice_size: int, commands, results) -> None:
    """The floor: a ROUTER that answers each push with a fixed ack, each pull or hello with
    fixed params, and nothing more (no decode, no credential check, no apply)."""
    import threading

    import zmq

    context = zmq.Context.instance()
    socket = context.socket(zmq.ROUTER)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    fingerprint = "f" * 32
    ack = msgpack.packb(
        {"kind": "ack", "worker": 0, "seq": 0, "version": 1, "fingerprint": fingerprint,
         "accepted": True, "reason": None, "protocol": transport.PROTOCOL_VERSION, "arrays": 0}
    )  # fmt: skip
    params = np.zeros(slice_size, np.float32).tobytes()
    count = [0]
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                count[0] += 1
                if len(frames) == 3:  # a push: routing id, header, slice
                    socket.send_multipart([frames[0], ack])
                else:
                    socket.send_multipart([frames[0], ack, params])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    results.put(("shard", 0, (f"tcp://127.0.0.1:{port}", fingerprint, slice_size, 0)))
    while commands.get() == "mark":
        results.put(("mark", 0, (time.process_time(), count[0])))
    stop.set()
    thread.join()
    socket.close(linger=0)


def client_process(index: int, workers: list[int], commands, results) -> None:
    """Bundles `workers`, each a DEALER: hello, then for each phase push at its rate and
    pull every `sync_every` pushes until told to stop; report ack latencies."""
    import zmq

    context = zmq.Context.instance()
    while True:
        phase = commands.get()
        if phase is None:
            return
        bundles_phase(index, workers, phase, context, commands, results)


def request_header(kind: str, *, arrays: int, **fields) -> bytes:
    """A request's packed header as the simulated bundles send it: built by hand, without
    `transport.make_header`'s validation (a light client), but with the fields it writes:
    `credential`, `worker`, `seq`, `version`, `fingerprint` and the kind's own."""
    return msgpack.packb(
        {"kind": kind, **fields, "protocol": transport.PROTOCOL_VERSION, "arrays": arrays}
    )


def bundles_phase(index: int, workers: list[int], phase, context, commands, results) -> None:
    """One phase of `client_process`: connect, hello, load the server until "stop". The
    phase names each worker's credential (`credentials`, by worker)."""
    import zmq

    endpoint, fingerprint, slice_size, credentials, rate, window, sync_every, raw = phase
    rng = np.random.default_rng(index)
    grads = (1e-3 * rng.standard_normal(slice_size)).astype(np.float32)
    sockets = {}
    for worker in workers:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets[worker] = sock
    seq = dict.fromkeys(workers, time.time_ns())
    version = dict.fromkeys(workers, 0)
    pushed = dict.fromkeys(workers, 0)
    in_flight: dict[int, dict[int, float]] = {w: {} for w in workers}
    owner = {sock: w for w, sock in sockets.items()}

    def request(worker: int, kind: str, arrays=(), **fields) -> int:
        seq[worker] += 1
        header = request_header(
            kind, arrays=len(arrays), credential=credentials[worker], worker=worker,
            seq=seq[worker], version=version[worker], fingerprint=fingerprint, **fields,
        )  # fmt: skip
        sockets[worker].send_multipart([header, *arrays], copy=False)
        return seq[worker]

    poller = zmq.Poller()
    for sock in sockets.values():
        poller.register(sock, zmq.POLLIN)
    for worker in workers:
        request(worker, "hello")
    waiting = set(workers)
    while waiting:  # the welcomes
        for sock, _ in poller.poll(STARTUP_SECONDS * 1000):
            frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[0])
            version[owner[sock]] = max(0, header["version"])
            waiting.discard(owner[sock])
    results.put(("ready", index, None))
    latencies: list[float] = []
    timed = False
    period = 1.0 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    due = {w: start + period * (i / len(workers)) for i, w in enumerate(workers)}
    while True:
        try:
            command = commands.get_nowait()
        except Exception:
            command = None
        if command == "timed":
            timed, latencies = True, []
        elif command == "stop":
            break
        now = time.perf_counter()
        for worker in workers:
            if len(in_flight[worker]) < window and due[worker] <= now:
                pushed[worker] += 1
                if pushed[worker] % sync_every == 0:
                    request(worker, "pull")
                s = request(worker, "push", [grads], mean_abs_td=1.0, frames=0)
                in_flight[worker][s] = now
                due[worker] = max(due[worker] + period, now - 1.0) if period else now
        next_due = min(due.values()) - time.perf_counter()
        timeout = 0 if next_due <= 0 and period else max(1, min(50, int(next_due * 1000)))
        for sock, _ in poller.poll(timeout):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                header = msgpack.unpackb(frames[0])
                worker = owner[sock]
                sent = in_flight[worker].pop(header["seq"], None)
                if raw and len(frames) == 1 and in_flight[worker]:
                    # The raw ROUTER's fixed ack echoes no seq: its acks come in order.
                    sent = in_flight[worker].pop(next(iter(in_flight[worker])))
                if header["kind"] == "ack" and sent is not None:
                    version[worker] = max(version[worker], header["version"])
                    if timed:
                        latencies.append(time.perf_counter() - sent)
                elif header["kind"] == "params" and not raw:
                    version[worker] = max(version[worker], header["version"])
    results.put(("latency", index, latencies))
    for sock in sockets.values():
        sock.close(linger=0)


def run_phase(target, args: ManyBundlesArgs, rate: float, clients, spawn, params, secret):
    """Start the server (`target`: the shard or the raw router), load it at `rate`,
    measure; returns a dict of figures."""
    from gorila_jax.core.shard_layout import ShardLayout
    from gorila_jax.wire.credentials import worker_credential

    results = spawn.Queue()
    commands = spawn.Queue()
    raw = target is raw_router
    if raw:
        total = sum(leaf.size for leaf in jax_leaves(params))
        server_args = (args.bundles, ShardLayout.even(total, SHARDS).size(0), commands, results)
    else:
        server_args = (SHARDS, 0, params, args.bundles, secret, commands, results)
    server = spawn.Process(target=target, args=server_args, name="server")
    server.start()
    collect = Collector(results, [server])
    (endpoint, fingerprint, slice_size, _) = collect.collect("shard", 1)[0]
    client_collect = Collector(clients[0]["results"], [c["process"] for c in clients] + [server])
    window, sync_every = args.window, args.sync_every
    for client in clients:  # each client process gets its own workers' credentials only
        credentials = {w: worker_credential(secret, w) for w in client["workers"]}
        client["commands"].put(
            (endpoint, fingerprint, slice_size, credentials, rate, window, sync_every, raw)
        )
    client_collect.collect("ready", len(clients))
    time.sleep(args.warmup)
    for client in clients:
        client["commands"].put("timed")
    commands.put("mark")
    cpu0, count0 = collect.collect("mark", 1)[0]
    t0 = time.perf_counter()
    time.sleep(args.seconds)
    commands.put("mark")
    cpu1, count1 = collect.collect("mark", 1)[0]
    elapsed = time.perf_counter() - t0
    for client in clients:
        client["commands"].put("stop")
    latencies = sorted(
        x for xs in client_collect.collect("latency", len(clients)).values() for x in xs
    )
    commands.put("quit")
    server.join(timeout=30)
    count = count1 - count0  # the shard: pushes applied; the raw router: messages
    pulls = 1.0 / args.sync_every
    return {
        "rate": rate,
        "absorbed": count / elapsed,
        "cpu_ms": 1e3 * (cpu1 - cpu0) / max(count, 1),
        # The raw router counts pulls as messages too; per push, as the shard is measured.
        "cpu_ms_per_push": 1e3 * (cpu1 - cpu0) / max(count / (1 + pulls) if raw else count, 1),
        "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def benchmark(args: ManyBundlesArgs) -> int:
    for name in ("bundles", "client_processes", "window", "sync_every"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise cli.CommandLineError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if not args.rates or min(args.rates) < 0:
        raise cli.CommandLineError(f"--rates must be >= 0 (0: unbounded), got {args.rates}")
    if args.client_processes > args.bundles:
        raise cli.CommandLineError("--client-processes must not exceed --bundles")
    import jax

    from gorila_jax.envs import model_of
    from gorila_jax.wire.credentials import new_run_secret

    config = _config(SHARDS)
    params = jax.tree.map(np.asarray, model_of(config).init(config.seed))
    secret = new_run_secret()
    spawn = mp.get_context("spawn")
    workers = np.array_split(np.arange(args.bundles), args.client_processes)
    shared_results = spawn.Queue()
    clients = [
        {"commands": spawn.Queue(), "results": shared_results, "workers": [int(w) for w in mine]}
        for mine in workers
    ]
    for index, client in enumerate(clients):
        process = spawn.Process(
            target=client_process,
            args=(index, client["workers"], client["commands"], shared_results),
            name=f"bundles {index}",
        )
        process.start()
        client["process"] = process
    print(
        f"{args.bundles} bundles in {args.client_processes} processes, window {args.window}, "
        f"a pull every {args.sync_every} pushes; shard 0 of {SHARDS}"
    )
    shard_phases, raw_phase = [], None
    try:
        for rate in args.rates:
            phase = run_phase(shard_process, args, rate, clients, spawn, params, secret)
            shard_phases.append(phase)
            print_phase("shard", phase)
        raw_phase = run_phase(raw_router, args, 0.0, clients, spawn, params, secret)
        print_phase("raw ROUTER (floor)", raw_phase)
    finally:
        for client in clients:
            client["commands"].put(None)
        for client in clients:
            client["process"].join(timeout=30)
            if client["process"].is_alive():
                client["process"].terminate()
    saturated = next(
        (p for p in shard_phases if p["rate"] == 0), max(shard_phases, key=lambda p: p["absorbed"])
    )
    print(
        f"saturation: {saturated['absorbed']:,.0f} pushes/s absorbed; the raw ROUTER answered "
        f"{raw_phase['absorbed']:,.0f} messages/s"
    )
    print(result_line("push_fixed_cost", saturated["cpu_ms"], raw_phase["cpu_ms_per_push"]))
    return 0


def print_phase(name: str, phase: dict) -> None:
    rate = "unbounded" if phase["rate"] == 0 else f"{phase['rate']:g}/s per bundle"
    print(
        f"{name:>20}, offered {rate:>18}: absorbed {phase['absorbed']:8,.0f}/s, "
        f"CPU {phase['cpu_ms']:.4f} ms per message ({phase['cpu_ms_per_push']:.4f} per push), "
        f"ack p50 {phase['p50_ms']:.2f} ms, p99 {phase['p99_ms']:.2f} ms"
    )


def jax_leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ManyBundlesArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
