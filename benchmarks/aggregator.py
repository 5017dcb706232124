"""Benchmark: a host's aggregator under its bundles' full Nature-CNN gradients, CPU per push.

With `--aggregate-per-host` every bundle of a host sends its whole gradient (1,687,206
float32, 6.75 MB for Pong's network) to the host's aggregator, which checks it, adds it
to the sum waiting for the next forward and acknowledges it. What that costs per push
decides how many bundles one aggregator can take (BENCHMARKS.md, the shard model).

The aggregator: the real `Aggregator` and its `serve` loop on a loopback socket in a
spawned process, in front of a stand-in for its client of the shards that always has room
and drops each forward after counting it (the forward's own cost, slicing the mean for the
shards and sending it, is the bundle client's, measured by `sharded_server.py`; it is paid
once per forward, not per push). The bundles: `--bundles` DEALER sockets in one spawned
process (`many_bundles.client_process`), each signed with its own worker's credential,
pushing a precomputed gradient as fast as its window of `--window` unacknowledged pushes
allows, and pulling every `--sync-every` pushes (answered "not modified": the params do
not move).

Measured over `--seconds` after `--warmup`: pushes absorbed per second and the
aggregator's process CPU per push (every thread: zmq's I/O thread and the serve loop);
`--repeats` runs, medians. The floor, same runs, same bundles: a raw pyzmq ROUTER
(`many_bundles.raw_router`) receiving the same messages and answering each with a fixed
ack: zmq's cost of moving 6.75 MB in and an ack out. Also printed: one `np.add` of such a
gradient into a sum (the memory traffic the aggregator cannot avoid).

    python benchmarks/aggregator.py [--bundles 8] [--seconds 5] [--repeats 3]

It ends with `RESULT aggregator_push value=<ms of aggregator CPU per push> floor=<ms of CPU
per push of the raw ROUTER> ratio=<value/floor>`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
from common import median_seconds, result_line
from many_bundles import client_process, raw_router
from sharded_server import Collector

from gorila_jax.core import cli


@dataclasses.dataclass(frozen=True)
class AggregatorArgs:
    """A host's aggregator under its bundles' full gradients: CPU per push."""

    bundles: int = 8
    """simulated bundles of the host (DEALER sockets, each its own worker)"""
    window: int = 2
    """unacknowledged pushes per bundle"""
    sync_every: int = 4
    """a pull every this many pushes"""
    seconds: float = 5.0
    """timed window per run"""
    warmup: float = 1.5
    """seconds of load before it"""
    repeats: int = 3
    """runs of the aggregator and of the floor, alternating"""


class DroppingUpstream:
    """The aggregator's client of the shards, standing in: always room, forwards dropped."""

    def __init__(self, num_params: int):
        from gorila_jax.bundle.client import Pulled

        self.initial = Pulled(np.zeros(num_params, np.float32), (0,))
        self.connections = [None]
        self.accepted, self.rejected, self.reconnects, self.error = 0, {}, 0, None
        self.forwards = 0

    def has_room(self) -> bool:
        return True

    def push(self, item) -> None:
        self.forwards += 1

    def pull(self) -> None:
        pass

    def latest(self):
        return None, None

    def failed(self) -> bool:
        return False

    def close(self, *, quick: bool, timeout_seconds: float) -> None:
        pass


def aggregator_process(bundles: int, num_params: int, secret: str, commands, results) -> None:
    """The measured side: an `Aggregator` serving on a thread; "mark" reports (process CPU
    seconds, pushes received)."""
    import threading

    import zmq

    from gorila_jax.aggregator.aggregator import Aggregator
    from gorila_jax.core.config import Config
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import WorkerAuthority

    fingerprint = "f" * 32
    hub = Aggregator(
        Config(), DroppingUpstream(num_params), workers=range(bundles),
        authority=WorkerAuthority(bundles, secret=secret), fingerprint=fingerprint,
    )  # fmt: skip
    socket, endpoint = transport.make_server_socket(
        zmq.Context.instance(), "tcp://127.0.0.1:0", hub.max_bytes
    )
    stop = threading.Event()
    thread = threading.Thread(target=hub.serve, args=(socket, stop.is_set), daemon=True)
    thread.start()
    results.put(("shard", 0, (endpoint, fingerprint, num_params, 0)))
    while commands.get() == "mark":
        results.put(("mark", 0, (time.process_time(), sum(hub.received.values()))))
    stop.set()
    thread.join(timeout=30)
    socket.close(linger=0)


def run_once(target, args: AggregatorArgs, client: dict, spawn, num_params: int, secret: str):
    """Start `target` (the aggregator or the raw ROUTER), load it, measure: (pushes per
    second, ms of its CPU per push)."""
    from gorila_jax.wire.credentials import worker_credential

    results, commands = spawn.Queue(), spawn.Queue()
    raw = target is raw_router
    server_args = (args.bundles, num_params, commands, results)
    if not raw:
        server_args = (args.bundles, num_params, secret, commands, results)
    server = spawn.Process(target=target, args=server_args, name="server")
    server.start()
    collect = Collector(results, [server])
    (endpoint, fingerprint, size, _) = collect.collect("shard", 1)[0]
    credentials = {w: worker_credential(secret, w) for w in client["workers"]}
    client["commands"].put(
        (endpoint, fingerprint, size, credentials, 0.0, args.window, args.sync_every, raw)
    )
    client_collect = Collector(client["results"], [client["process"], server])
    client_collect.collect("ready", 1)
    time.sleep(args.warmup)
    commands.put("mark")
    cpu0, count0 = collect.collect("mark", 1)[0]
    t0 = time.perf_counter()
    time.sleep(args.seconds)
    commands.put("mark")
    cpu1, count1 = collect.collect("mark", 1)[0]
    elapsed = time.perf_counter() - t0
    client["commands"].put("stop")
    client_collect.collect("latency", 1)
    commands.put("quit")
    server.join(timeout=30)
    count = count1 - count0
    if raw:  # the raw router counts pulls as messages too
        count = count / (1 + 1.0 / args.sync_every)
    return count / elapsed, 1e3 * (cpu1 - cpu0) / max(count, 1)


def benchmark(args: AggregatorArgs) -> int:
    for name in ("bundles", "window", "sync_every", "repeats"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise cli.CommandLineError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if not args.seconds > 0 or args.warmup < 0:
        raise cli.CommandLineError("--seconds must be > 0 and --warmup >= 0")
    from gorila_jax.core.config import Config
    from gorila_jax.envs import model_of
    from gorila_jax.wire.credentials import new_run_secret

    num_params = model_of(Config()).num_params
    secret = new_run_secret()
    spawn = mp.get_context("spawn")
    client = {"commands": spawn.Queue(), "results": spawn.Queue(), "workers": []}
    client["workers"] = list(range(args.bundles))
    client["process"] = spawn.Process(
        target=client_process,
        args=(0, client["workers"], client["commands"], client["results"]),
        name="bundles",
    )
    client["process"].start()
    print(
        f"{args.bundles} bundles pushing {num_params:,}-element gradients "
        f"({4 * num_params / 1e6:.2f} MB), window {args.window}, a pull every "
        f"{args.sync_every} pushes"
    )
    runs: dict[str, list[tuple[float, float]]] = {"aggregator": [], "raw ROUTER (floor)": []}
    try:
        for _ in range(args.repeats):
            runs["aggregator"].append(
                run_once(aggregator_process, args, client, spawn, num_params, secret)
            )
            runs["raw ROUTER (floor)"].append(
                run_once(raw_router, args, client, spawn, num_params, secret)
            )
            for name, measured in runs.items():
                rate, cpu = measured[-1]
                print(f"{name:>20}: {rate:8,.0f} pushes/s, {cpu:.3f} ms of CPU per push")
    finally:
        client["commands"].put(None)
        client["process"].join(timeout=30)
        if client["process"].is_alive():
            client["process"].terminate()
    total, grads = np.zeros(num_params, np.float32), np.ones(num_params, np.float32)
    add_ms = 1e3 * median_seconds(lambda: np.add(total, grads, out=total), repeats=50)
    medians = {
        name: (statistics.median(r for r, _ in m), statistics.median(c for _, c in m))
        for name, m in runs.items()
    }
    for name, (rate, cpu) in medians.items():
        print(f"median {name}: {rate:,.0f} pushes/s, {cpu:.3f} ms of CPU per push")
    print(f"one np.add of the gradient into the sum: {add_ms:.3f} ms")
    value, floor = medians["aggregator"][1], medians["raw ROUTER (floor)"][1]
    print(result_line("aggregator_push", value, floor))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, AggregatorArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
