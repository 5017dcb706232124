"""Benchmark: CPU seconds per push of a parameter server split into S = 1, 2, 4 shards.

The Nature CNN of Pong (`Config()` defaults: its params built as `server.process.run_server` builds
them), Adam as configured, `server_shards=S`. Each shard is its own spawned process running
`ParameterServer(..., shard=k).serve` on a loopback socket of its own (a thread of that
process; the process's main thread only answers the parent's "mark" requests). Light fake
bundles (spawned processes, no learner, `--bundles` of them) hold one `ServerConnection`
per shard and push precomputed random float32 slices as fast as the acknowledgements come
back, as `RemoteLearner` does: every shard its slice at once (send all, then collect the
acks), `PUSHES_IN_FLIGHT` whole pushes unacknowledged, each slice naming as its base
version the version of that shard's latest ack. The outlier filter is off and staleness is never
refused (it stays small: a few pushes in flight). No pulls. The shards hold the run secret
and check each push's credential; a bundle holds its own worker's credential only.

Measured per shard, over the timed window only (after `--warmup` seconds of pushing; each
shard compiles its apply before it reports ready): the process's own CPU time (user + sys
of all its threads: zmq's I/O thread, XLA's, the serve loop; `os.times` at both ends of the
window) divided by the updates it applied (its version, read at the same moments), the
bytes in (request header + slice) and out (ack header) per push from the encoded frames,
and the pushes it absorbed per second. The whole server's absorb rate counts the pushes
every shard accepted. Also printed: the bundles' CPU per whole push (psutil).

The figure is the per-shard CPU seconds per push at S=2 (the mean of its two shards); the
floor is half of the same figure at S=1, measured in the same run: what two shards would
cost if splitting the vector divided all of the work. The ratio is value/floor, LOWER is
better (goal: <= 1.2); what is above 1 is per-push work that does not shrink with the slice,
or work that shrinks less than the slice does.

Then, for each S of `--alone` (half the window each), shard 0 of S runs alone: at S=2 a
half slice with no sibling shard on the same cores (do two shards cost each other?), and
at the largest (256: a 6,591-element slice) the per-push CPU that does not shrink with the
slice (zmq, Python, the dispatch of the apply), printed next to `ParameterServer.handle`'s
own share of it. The summary splits c(S) into that fixed part and a part that scales as
1/S, and prints the shards that 100 CPU bundles and 8 or 64 GPU bundles would need, and
the network each shard would carry (the model in BENCHMARKS.md). The slice lengths are
printed: an odd length makes the jitted apply about 1.7x slower per element on this CPU
(measured apart), and `ShardLayout.even` cuts the Nature CNN's 1,687,206 params into two
odd slices at S=2 and into two odd slices of four at S=4.

On a machine with fewer cores than shards + bundles the absorb rates do not scale with S
(the processes share the cores); CPU per push does not depend on that.

    python benchmarks/sharded_server.py [--seconds 10] [--warmup 2] [--bundles 2]
        [--shards 1 2 4] [--alone 2 256]
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from collections import Counter

import numpy as np
from common import result_line

from gorila_jax.core import cli

MEAN_ABS_TD = 1.0  # each push's mean |TD error| (the outlier filter is off)
TIMEOUT_SECONDS = 120.0
STARTUP_SECONDS = 300.0


@dataclasses.dataclass(frozen=True)
class ShardedServerArgs:
    """CPU per push of a parameter server split into shards."""

    seconds: float = 10.0
    """timed window per S"""
    warmup: float = 2.0
    """seconds of pushes before it"""
    bundles: int = 2
    """fake bundle processes"""
    shards: tuple[int, ...] = (1, 2, 4)
    """Server shard counts S to measure, one phase each (must include 1 and 2)."""
    alone: tuple[int, ...] = (2, 256)
    """also run shard 0 of S alone, for each S given: S=2 without its sibling competing for
    memory bandwidth, the largest (a tiny slice) for the fixed cost"""


def _config(shards: int):
    from gorila_jax.core.config import Config

    # Config defaults (Pong, Adam, clipping in the bundle), the outlier filter off and no
    # staleness bound: the probe's tiny pushes come so fast that a bundle the scheduler
    # leaves waiting can fall more than the default 64 versions behind.
    return dataclasses.replace(
        Config(), server_shards=shards, outlier_k=0.0, max_staleness=1_000_000
    )


def shard_process(
    shards: int, shard: int, params, num_workers: int, secret: str, commands, results
) -> None:
    """One server shard: build it (checking credentials with the run `secret`), compile its
    apply, serve on loopback, answer marks."""
    import threading

    import jax
    import zmq

    from gorila_jax.server.parameter_server import ParameterServer, max_message_bytes
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import WorkerAuthority

    config = _config(shards)
    authority = WorkerAuthority(num_workers, secret=secret)
    server = ParameterServer(
        config, params, num_workers=num_workers, authority=authority, shard=shard
    )
    # Compile the apply for every batch size before any push.
    server.warm_up()
    jax.block_until_ready(server.params)
    server.host_params()
    context = zmq.Context.instance()
    socket, endpoint = transport.make_server_socket(
        context, "tcp://127.0.0.1:0", max_message_bytes(config, server.total_params)
    )
    stop = threading.Event()
    serving = threading.Thread(
        target=server.serve, args=(socket, endpoint, stop.is_set), daemon=True
    )
    serving.start()
    results.put(("shard", shard, (endpoint, server.fingerprint, server.num_params, os.getpid())))
    try:
        while True:
            command = commands.get()
            if command == "mark":
                # User + sys CPU of the whole process, every thread (finer than os.times).
                cpu = time.process_time()
                results.put(("mark", shard, (cpu, server.version)))
            else:
                break
    finally:
        stop.set()
        serving.join()
        socket.close(linger=0)


def bundle_process(worker: int, commands, events: dict, results) -> None:
    """A fake bundle: for each phase it is given (with this worker's credential), push
    slices to every shard until stopped."""
    from collections import Counter, deque

    from gorila_jax.bundle.client import PUSHES_IN_FLIGHT, ServerConnection
    from gorila_jax.core.shard_layout import ShardLayout

    rng = np.random.default_rng(worker)
    while True:
        phase = commands.get()
        if phase is None:
            return
        endpoints, server_shards, fingerprint, credential, num_params, max_bytes = phase
        layout = ShardLayout.even(num_params, server_shards)
        grads = (1e-3 * rng.standard_normal(num_params)).astype(np.float32)
        # Contiguous views, sent without a copy; the probe runs only the first shard(s).
        slices = layout.split(grads)[: len(endpoints)]
        connections = [
            ServerConnection(
                endpoint,
                credential=credential,
                worker=worker,
                fingerprint=fingerprint,
                num_params=layout.size(k),
                max_bytes=max_bytes,
                timeout_seconds=TIMEOUT_SECONDS,
            )
            for k, endpoint in enumerate(endpoints)
        ]
        try:
            versions = [connection.hello()[1] for connection in connections]
            results.put(("ready", worker, None))
            events["start"].wait()
            pushes = 0
            timed = {
                "pushes": 0,
                "all_accepted": 0,
                "accepted": [0] * len(connections),
                "refused": [Counter() for _ in connections],
            }
            in_flight: deque[list[int]] = deque()
            while not events["stop"].is_set():
                while len(in_flight) < PUSHES_IN_FLIGHT:
                    # Every shard its slice at once; the acks are collected after.
                    in_flight.append(
                        [
                            connection.send_push(
                                piece, base_version=version, mean_abs_td=MEAN_ABS_TD, frames=pushes
                            )
                            for connection, piece, version in zip(
                                connections, slices, versions, strict=True
                            )
                        ]
                    )
                    pushes += 1
                accepted_all = True
                counting = events["timed"].is_set()
                for k, (connection, seq) in enumerate(
                    zip(connections, in_flight.popleft(), strict=True)
                ):
                    accepted, reason, version = connection.receive_ack(seq)
                    versions[k] = max(versions[k], version)
                    accepted_all &= accepted
                    if counting:
                        timed["accepted"][k] += int(accepted)
                        if not accepted:
                            timed["refused"][k][reason] += 1
                if counting:
                    timed["pushes"] += 1
                    timed["all_accepted"] += int(accepted_all)
            for seqs in in_flight:
                for connection, seq in zip(connections, seqs, strict=True):
                    connection.receive_ack(seq)
            results.put(("load", worker, timed))
        finally:
            for connection in connections:
                connection.close()


class Collector:
    """Replies from the spawned processes, by tag, failing fast when one has died."""

    def __init__(self, results, processes: list):
        self.results = results
        self.processes = processes

    def collect(self, kind: str, count: int, timeout: float = STARTUP_SECONDS) -> dict:
        got = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                tag, index, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.processes if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"waiting for {kind}: {'died: ' + ', '.join(dead) if dead else 'timeout'}"
                    ) from None
                continue
            if tag != kind:
                raise RuntimeError(f"expected {kind}, got {tag}")
            got[index] = value
        return got


def wire_bytes(secret: str, fingerprint: str, slice_size: int) -> tuple[int, int]:
    """Bytes of one push of a `slice_size` slice (header, with worker 1's credential, +
    vector frame) and of its ack, as encoded (zmq adds a few bytes of framing per frame,
    TCP/IP its headers)."""
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import worker_credential

    header = transport.make_header(
        "push", credential=worker_credential(secret, 1), worker=1, seq=time.time_ns(),
        version=123_456, fingerprint=fingerprint, mean_abs_td=MEAN_ABS_TD, frames=1_234_567,
    )  # fmt: skip
    push = transport.encode(header, [np.zeros(slice_size, np.float32)])
    ack = transport.encode(
        transport.reply_header(
            header, "ack", version=123_457, fingerprint=fingerprint, accepted=True, reason=None
        )
    )
    return sum(memoryview(f).nbytes for f in push), sum(memoryview(f).nbytes for f in ack)


def run_phase(
    shards: int,
    params,
    secret: str,
    args,
    bundles: list,
    spawn,
    *,
    running: int | None = None,
    seconds: float | None = None,
) -> dict:
    """Start S shard processes (or only the first `running` of them: the probe), push from
    every bundle, measure, stop the shards."""
    import jax
    import psutil

    from gorila_jax.server.parameter_server import max_message_bytes
    from gorila_jax.wire.credentials import worker_credential

    running = shards if running is None else running
    results = spawn.Queue()
    commands = [spawn.Queue() for _ in range(running)]
    processes = [
        spawn.Process(
            target=shard_process,
            args=(shards, k, params, args.bundles, secret, commands[k], results),
            name=f"shard {k} of {shards}",
        )
        for k in range(running)
    ]
    for process in processes:
        process.start()
    collector = Collector(results, processes + [b["process"] for b in bundles])
    try:
        info = collector.collect("shard", running)
        endpoints = [info[k][0] for k in range(running)]
        fingerprint = info[0][1]
        sizes = [info[k][2] for k in range(running)]
        num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
        max_bytes = max_message_bytes(_config(shards), num_params)
        for event in bundles[0]["events"].values():
            event.clear()
        for worker, bundle in enumerate(bundles):  # bundle_process(worker, ...)
            credential = worker_credential(secret, worker)
            bundle["commands"].put(
                (endpoints, shards, fingerprint, credential, num_params, max_bytes)
            )
        # The bundles answer on their own queue (shared across phases).
        Collector(bundles[0]["queue"], collector.processes).collect("ready", len(bundles))
        events = bundles[0]["events"]
        events["start"].set()
        time.sleep(args.warmup)

        def mark():
            for command in commands:
                command.put("mark")
            bundle_cpu = sum(sum(psutil.Process(b["process"].pid).cpu_times()[:2]) for b in bundles)
            marks = collector.collect("mark", running, timeout=60.0)
            return time.perf_counter(), marks, bundle_cpu

        events["timed"].set()
        start, first, bundle_cpu0 = mark()
        time.sleep(args.seconds if seconds is None else seconds)
        end, last, bundle_cpu1 = mark()
        events["timed"].clear()
        events["stop"].set()
        loads = Collector(bundles[0]["queue"], collector.processes).collect("load", len(bundles))
    finally:
        for command in commands:
            command.put("stop")
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()

    seconds = end - start
    per_shard = []
    for k in range(running):
        cpu = last[k][0] - first[k][0]
        updates = last[k][1] - first[k][1]
        push_bytes, ack_bytes = wire_bytes(secret, fingerprint, sizes[k])
        per_shard.append(
            {
                "size": sizes[k],
                "cpu_s": cpu,
                "updates": updates,
                "cpu_per_push": cpu / max(updates, 1),
                "rate": updates / seconds,
                "bytes_in": push_bytes,
                "bytes_out": ack_bytes,
                "rejections": dict(sum((load["refused"][k] for load in loads.values()), Counter())),
            }
        )
    whole = sum(load["all_accepted"] for load in loads.values())
    return {
        "shards": shards,
        "running": running,
        "seconds": seconds,
        "per_shard": per_shard,
        "cpu_per_push": statistics.mean(s["cpu_per_push"] for s in per_shard),
        "server_rate": whole / seconds,
        "bundle_cpu_per_push": (bundle_cpu1 - bundle_cpu0) / max(whole, 1),
        "loads": loads,
    }


def print_phase(phase: dict) -> None:
    shards, seconds = phase["shards"], phase["seconds"]
    if phase["running"] == shards:
        print(f"\nS = {shards}: {seconds:.1f} s timed")
    else:
        print(f"\nshard 0 of S = {shards} alone: {seconds:.1f} s timed")
    print(
        f"{'shard':>5} {'params':>10} {'CPU s':>7} {'pushes':>7} {'pushes/s':>9} "
        f"{'CPU ms/push':>12} {'B in/push':>11} {'B out/push':>10}  rejections"
    )
    for k, s in enumerate(phase["per_shard"]):
        print(
            f"{k:>5} {s['size']:>10,} {s['cpu_s']:>7.2f} {s['updates']:>7} {s['rate']:>9.1f} "
            f"{s['cpu_per_push'] * 1e3:>12.3f} {s['bytes_in']:>11,} {s['bytes_out']:>10,}  "
            f"{s['rejections'] or 'none'}"
        )
    if phase["running"] != shards:
        return
    full = sum(s["cpu_per_push"] for s in phase["per_shard"])
    print(
        f"mean per-shard CPU {phase['cpu_per_push'] * 1e3:.3f} ms/push; all shards together "
        f"{full * 1e3:.3f} ms per whole push; whole server absorbed "
        f"{phase['server_rate']:.1f} pushes/s (every shard accepted); bundles' CPU "
        f"{phase['bundle_cpu_per_push'] * 1e3:.3f} ms per whole push"
    )


def benchmark(args: ShardedServerArgs) -> int:
    if not {1, 2} <= set(args.shards):
        raise cli.CommandLineError("--shards must include 1 and 2 (the figure and its floor)")

    import jax

    from gorila_jax.envs import model_of
    from gorila_jax.wire.credentials import new_run_secret

    config = _config(1)
    model = model_of(config)
    num_actions = model.num_actions
    params = jax.tree.map(np.asarray, model.init(config.seed))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    secret = new_run_secret()

    spawn = mp.get_context("spawn")
    bundle_queue = spawn.Queue()
    events = {name: spawn.Event() for name in ("start", "timed", "stop")}
    bundles = []
    for worker in range(args.bundles):
        commands = spawn.Queue()
        process = spawn.Process(
            target=bundle_process,
            args=(worker, commands, events, bundle_queue),
            name=f"bundle {worker}",
        )
        process.start()
        bundles.append(
            {"process": process, "commands": commands, "queue": bundle_queue, "events": events}
        )
    phases, alone = {}, {}
    try:
        for shards in args.shards:
            phases[shards] = run_phase(shards, params, secret, args, bundles, spawn)
        for shards in args.alone:
            alone[shards] = run_phase(
                shards, params, secret, args, bundles, spawn, running=1, seconds=args.seconds / 2
            )
    finally:
        for bundle in bundles:
            bundle["commands"].put(None)
        for bundle in bundles:
            bundle["process"].join(timeout=30)
            if bundle["process"].is_alive():
                bundle["process"].terminate()

    print(
        f"\nmodel: Nature CNN ({config.env_id}, {num_actions} actions), {num_params:,} params "
        f"({num_params * 4 / 2**20:.2f} MiB), {config.optimizer}; {args.bundles} fake bundles, "
        f"{os.cpu_count()} cores"
    )
    for shards in args.shards:
        print_phase(phases[shards])
    for shards in args.alone:
        print_phase(alone[shards])
    if alone:
        probe = alone[max(alone)]
        handle = handle_cpu_per_push(params, max(alone), secret)
        print(
            f"of the probe's {probe['cpu_per_push'] * 1e3:.3f} ms, ParameterServer.handle() "
            f"alone (decode, checks, apply, ack; no sockets, in this process) takes "
            f"{handle * 1e3:.3f} ms CPU"
        )
        summarize(phases, alone, num_params)

    value = phases[2]["cpu_per_push"]
    floor = phases[1]["cpu_per_push"] / 2
    print("\nshard_cpu_per_push (s): per-shard CPU per push at S=2 vs half of S=1's; goal <= 1.2")
    print(result_line("shard_cpu_per_push", value, floor))
    return 0


# (label, bundles, pushes/s per bundle) for the printed model: CPU bundles at the measured
# learner step (BENCHMARKS.md: 28-36 ms), GPU bundles at a 2 ms step.
SCENARIOS = (("100 CPU bundles, 30 ms step", 100, 33.0), ("8 GPU bundles, 2 ms step", 8, 500.0),
             ("64 GPU bundles, 2 ms step", 64, 500.0))  # fmt: skip


def handle_cpu_per_push(params, shards: int, secret: str, seconds: float = 2.0) -> float:
    """CPU seconds per push of `ParameterServer.handle` alone for shard 0 of `shards`
    (worker 0's pushes, its credential checked as the served shards check it)."""
    from gorila_jax.server.parameter_server import ParameterServer
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import WorkerAuthority, worker_credential

    authority = WorkerAuthority(1, secret=secret)
    server = ParameterServer(_config(shards), params, num_workers=1, authority=authority, shard=0)
    credential = worker_credential(secret, 0)
    grads = np.full(server.num_params, 1e-3, np.float32)
    payload = grads.tobytes()  # read-only and not 64-byte aligned, like a received frame
    seq = time.time_ns()
    pushes = 0
    for phase_seconds in (0.5, seconds):  # warm-up (compiles the apply), then timed
        start, cpu, first = time.perf_counter(), time.process_time(), pushes
        while time.perf_counter() - start < phase_seconds:
            seq += 1
            header = transport.make_header(
                "push", credential=credential, worker=0, seq=seq, version=server.version,
                fingerprint=server.fingerprint, mean_abs_td=MEAN_ABS_TD, frames=pushes,
            )  # fmt: skip
            server.handle([transport.encode(header, [grads])[0], payload])
            pushes += 1
    if server.counters.rejections:  # a refused push costs less: the figure would mean nothing
        raise RuntimeError(f"handle() refused pushes: {dict(server.counters.rejections)}")
    return (time.process_time() - cpu) / (pushes - first)


def summarize(phases: dict, alone: dict, num_params: int) -> None:
    """c(S) = fixed + scaled(S) / S, with `fixed` the probe's per-push CPU; the shards a
    load of N bundles x r pushes/s needs (each shard absorbs every push: N r c(S) <= 1 core)
    and the network each of them then carries."""
    probe = alone[max(alone)]
    fixed = probe["cpu_per_push"]
    header = probe["per_shard"][0]["bytes_in"] - 4 * probe["per_shard"][0]["size"]
    ack = probe["per_shard"][0]["bytes_out"]
    print(
        f"\nper-push cost that does not shrink with the slice (probe): {fixed * 1e3:.3f} ms CPU, "
        f"{header + ack} B of headers: one shard absorbs at most {1 / fixed:,.0f} pushes/s"
    )
    runs = [(f"S = {s}", s, p) for s, p in sorted(phases.items())]
    runs += [(f"shard 0 of S = {s} alone", s, p) for s, p in sorted(alone.items())[:-1]]
    for label, shards, phase in runs:
        scaled = shards * (phase["cpu_per_push"] - fixed)
        print(
            f"{label}: c(S) {phase['cpu_per_push'] * 1e3:.3f} ms per shard push, "
            f"S * c(S) {shards * phase['cpu_per_push'] * 1e3:.3f} ms per whole push, "
            f"scaled part S * (c(S) - fixed) {scaled * 1e3:.3f} ms"
        )
    largest = max(phases)
    scaled = largest * (phases[largest]["cpu_per_push"] - fixed)
    print(f"model (scaled part as at S = {largest}, fixed as the probe's):")
    for label, bundles, rate in SCENARIOS:
        load = bundles * rate  # pushes/s that every shard receives
        if load * fixed >= 1.0:
            print(
                f"  {label}: {load:,.0f} pushes/s per shard; the fixed cost alone needs "
                f"{load * fixed:.2f} cores per shard: no number of shards is enough"
            )
            continue
        shards = math.ceil(load * scaled / (1.0 - load * fixed))
        bits = load * (4 * num_params / shards + header + ack) * 8
        print(
            f"  {label}: {load:,.0f} pushes/s per shard; shards >= {load:,.0f} x "
            f"{scaled * 1e3:.3f} ms / (1 - {load:,.0f} x {fixed * 1e3:.3f} ms) = {shards}; "
            f"{bits / 1e9:.1f} Gbit/s in+out per shard"
        )
    print(
        "  (each shard receives every bundle's push, so N r x fixed must stay under one "
        "core; without the fixed cost, shards >= N r x scaled: "
        + ", ".join(f"{math.ceil(b * r * scaled)} for {b} x {r:g}/s" for _, b, r in SCENARIOS)
        + ")"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ShardedServerArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
