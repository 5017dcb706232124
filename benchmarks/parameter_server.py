"""Benchmark: parameter-server pushes per second, Nature CNN with Adam, 2 client processes.

The server (`ParameterServer.serve`, in a thread of this process) listens on loopback; two
spawned client processes (workers 0 and 1, each a `ServerConnection` with its worker's
credential) push a precomputed float32 gradient as fast as the replies come back and pull
the params every `--sync-every` pushes, as a bundle does. Each push names as its base
version the version of the params its client last pulled (what a bundle computes its
gradient on); staleness is never refused, the outlier filter is off, clipping stays at the
config's default.

Measured: accepted pushes / wall seconds over the timed window (after a warm-up; the apply
is compiled before it).

Floor, measured in the same run in the server's process: the rate if each push cost only
the jitted full apply (median, `block_until_ready`) plus copying its bytes at the measured
memory bandwidth (a large `np.copyto`, bytes read + written per second): the gradient in,
and 1/sync_every of a params copy out, each copy reading and writing its bytes. Both parts
are measured before and after the clients run; the floor uses the mean of the two. The
ratio is value/floor, HIGHER is better (goal: >= 0.7).

Also printed: the median push + pull round trip of one client with nothing else running,
against a raw pyzmq DEALER/ROUTER round trip of the same bytes (gradient out, params back),
interleaved (that ratio is value/floor, lower is better); the in-process medians of the
server's per-push steps; and the rate of `ParameterServer.handle` alone, without sockets,
on a second server. `RESULT ps_push value=<pushes/s> floor=<pushes/s> ratio=<value/floor>`
follows, then the last line, `RESULT guarded_apply value=<ms> floor=<ms> ratio=<>`: the
server's apply of one full Nature-CNN gradient with its guard (`guarded_apply_seconds`)
against the plain donated Adam apply, interleaved in the same process (goal: ratio <= 1.2).

    python benchmarks/parameter_server.py [--seconds 15] [--warmup 3] [--sync-every 8]
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import statistics
import sys
import threading
import time

import numpy as np
from common import median_seconds, result_line

from gorila_jax.core import cli

MEAN_ABS_TD = 1.0  # each push's mean |TD error| (the outlier filter is off)
MAX_BYTES = 256 * 1024 * 1024
TIMEOUT_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class ParameterServerArgs:
    """Time pushes to a parameter server against the apply and copy floor."""

    seconds: float = 15.0
    """timed window"""
    warmup: float = 3.0
    """seconds before the window"""
    sync_every: int = 8
    """pushes per pull, per client"""
    roundtrips: int = 30
    """Push + pull round trips timed with one client alone (and raw zmq ones)."""


def _gradient(num_params: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1e-3 * rng.standard_normal(num_params)).astype(np.float32)


def _connect(endpoint: str, credential: str, fingerprint: str, num_params: int, worker: int):
    from gorila_jax.bundle.client import ServerConnection

    return ServerConnection(
        endpoint,
        credential=credential,
        worker=worker,
        fingerprint=fingerprint,
        num_params=num_params,
        max_bytes=MAX_BYTES,
        timeout_seconds=TIMEOUT_SECONDS,
    )


def load_client(
    worker: int,
    endpoint: str,
    credential: str,
    fingerprint: str,
    num_params: int,
    sync_every: int,
    events: dict,
    results,
) -> None:
    """Push as fast as replies come, pull every `sync_every` pushes, until told to stop."""
    from gorila_jax.bundle.client import PUSHES_IN_FLIGHT

    grads = _gradient(num_params, worker)
    connection = _connect(endpoint, credential, fingerprint, num_params, worker)
    try:
        _, params_version, _ = connection.hello()
        results.put(("ready", worker, None))
        events["start"].wait()
        pushes = 0
        timed = {"pushes": 0, "accepted": 0, "pulls": 0, "push_s": 0.0, "pull_s": 0.0}
        in_flight: list[int] = []  # as a bundle does: PUSHES_IN_FLIGHT unacknowledged pushes
        while not events["stop"].is_set():
            counting = events["timed"].is_set()
            start = time.perf_counter()
            while len(in_flight) < PUSHES_IN_FLIGHT:
                in_flight.append(
                    connection.send_push(
                        grads, base_version=params_version, mean_abs_td=MEAN_ABS_TD, frames=pushes
                    )
                )
                pushes += 1
            accepted, _, _ = connection.receive_ack(in_flight.pop(0))
            pushed = time.perf_counter()
            if counting:
                timed["pushes"] += 1
                timed["accepted"] += int(accepted)
                timed["push_s"] += pushed - start
            if pushes % sync_every == 0:
                params, version = connection.receive_pulled(connection.send_pull(params_version))
                if params is not None:
                    params_version = version
                if counting:
                    timed["pulls"] += 1
                    timed["pull_s"] += time.perf_counter() - pushed
        for seq in in_flight:
            connection.receive_ack(seq)
        connection.stop()
        results.put(("load", worker, timed))
    finally:
        connection.close()


def roundtrip_client(
    endpoint: str,
    echo_endpoint: str,
    credential: str,
    fingerprint: str,
    num_params: int,
    repeats: int,
    results,
) -> None:
    """Interleaved medians: push + pull(-1) through the server, raw zmq echo of the bytes."""
    import zmq

    grads = _gradient(num_params, 7)
    connection = _connect(endpoint, credential, fingerprint, num_params, 0)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(echo_endpoint)
    try:
        _, version, _ = connection.hello()

        def server_trip() -> None:
            nonlocal version
            seq = connection.send_push(
                grads, base_version=version, mean_abs_td=MEAN_ABS_TD, frames=0
            )
            connection.receive_ack(seq)
            _, version = connection.receive_pulled(connection.send_pull(-1))

        def raw_trip() -> None:
            raw.send(grads, copy=False)
            raw.recv(copy=False)

        for _ in range(3):
            server_trip()
            raw_trip()
        server_times, raw_times = [], []
        for _ in range(repeats):
            for trip, times in ((server_trip, server_times), (raw_trip, raw_times)):
                start = time.perf_counter()
                trip()
                times.append(time.perf_counter() - start)
        raw.send(b"quit")
        results.put(
            ("roundtrip", 0, (statistics.median(server_times), statistics.median(raw_times)))
        )
    finally:
        raw.close(linger=0)
        connection.close()


def echo_server(socket, reply: np.ndarray, stop: threading.Event) -> None:
    """Answer every message on a ROUTER with `reply` until a b"quit" arrives."""
    import zmq

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(timeout=100):
            continue
        routing_id, frame = socket.recv_multipart(copy=False)
        if frame.buffer.nbytes == 4 and frame.bytes == b"quit":
            return
        socket.send_multipart([routing_id, reply], copy=False)


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by a large `np.copyto`."""
    source = np.ones(megabytes * 1024 * 1024 // 4, np.float32)
    target = np.empty_like(source)
    seconds = median_seconds(lambda: np.copyto(target, source), repeats=repeats, warmup=1)
    return 2.0 * source.nbytes / seconds


def apply_seconds(server, grads: np.ndarray, repeats: int = 30) -> float:
    """Median seconds of the server's apply of one full gradient (as a push applies it)."""
    import jax

    def apply():
        server.apply(0, grads)
        jax.block_until_ready(server.params)

    return median_seconds(apply, repeats=repeats)


def guarded_apply_seconds(server, grads: np.ndarray, repeats: int = 40) -> tuple[float, float]:
    """Median seconds of (the server's guarded apply of one full gradient, the plain
    donated Adam apply of the same size), interleaved so both see the same machine.

    Guarded: what a push costs the server from the check on arrival to its update (the
    squared norm on the host, then the shard state's apply: the host stack and device_put,
    the jitted update, waited for). The params' own finiteness check runs on the host copy
    made once per version for pulls (`ParameterServer.check_finite`), not per push.
    Plain: `jax.jit(update, donate_argnums=(0, 1))` of optax's Adam, the gradient put on
    the device, waited for: no check at all.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from gorila_jax.server.shard_state import Push

    tx = optax.adam(server.config.learning_rate)

    def update(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    plain_update = jax.jit(update, donate_argnums=(0, 1))
    plain = [jnp.zeros(grads.size, jnp.float32)]
    plain.append(tx.init(plain[0]))

    def guarded_once():
        float(np.dot(grads, grads))  # the check on arrival
        server.state = server._apply(server.state, [Push(grads)])
        jax.block_until_ready(server.state.params)

    def plain_once():
        plain[0], plain[1] = plain_update(plain[0], plain[1], jax.device_put(grads))
        jax.block_until_ready(plain[0])

    timings: dict[str, list[float]] = {"guarded": [], "plain": []}
    for repeat in range(repeats + 3):
        for name, once in (("guarded", guarded_once), ("plain", plain_once)):
            start = time.perf_counter()
            once()
            if repeat >= 3:  # the first calls compile
                timings[name].append(time.perf_counter() - start)
    return statistics.median(timings["guarded"]), statistics.median(timings["plain"])


def component_costs(server, grads: np.ndarray, credential: str) -> dict[str, float]:
    """Median seconds of the server's per-push steps, outside any socket (for the printout);
    `credential`: worker 0's. The decode includes the server's credential check."""
    import jax.numpy as jnp

    from gorila_jax.wire import transport

    header = transport.make_header(
        "push",
        credential=credential,
        worker=0,
        seq=1,
        version=0,
        fingerprint=server.fingerprint,
        mean_abs_td=MEAN_ABS_TD,
        frames=0,
    )
    # bytes objects: read-only and 16 bytes off a 64-byte boundary, like zmq's frames.
    frames = [bytes(frame) for frame in transport.encode(header, [grads])]

    def decode():
        return transport.decode(
            frames,
            authenticate=lambda h: server.authority.check(h, None),
            expected_fingerprint=server.fingerprint,
            layout_for=server._vector_length,
            max_bytes=server.max_bytes,
        )

    view = decode().arrays[0]
    reply = transport.reply_header(
        header,
        "ack",
        version=header["version"],
        fingerprint=header["fingerprint"],
        accepted=True,
        reason=None,
    )

    def as_device():
        jnp.asarray(view).block_until_ready()

    return {
        "apply": apply_seconds(server, grads),
        "decode": median_seconds(decode, repeats=30),
        "all_finite": median_seconds(lambda: transport.all_finite([view]), repeats=30),
        "jnp.asarray(grads)": median_seconds(as_device, repeats=30),
        "host_params copy": median_seconds(
            lambda: np.array(server.params, dtype=np.float32), repeats=30
        ),
        "encode ack": median_seconds(lambda: transport.encode(reply), repeats=30),
    }


def handle_rate(
    server, grads: np.ndarray, sync_every: int, seconds: float, credentials: list[str]
) -> float:
    """Pushes/s of `server.handle` alone (no sockets): decode, checks, apply, ack, and a
    pull (params copy) every `sync_every` pushes, alternating workers 0 and 1
    (`credentials`: theirs). Use a fresh server, not the served one."""
    import jax

    from gorila_jax.wire import transport

    payload = grads.tobytes()  # read-only and not 64-byte aligned, like a received frame
    seq = 0

    def header_frame(kind: str, arrays=(), *, version: int, **fields) -> bytes:
        nonlocal seq
        seq += 1
        header = transport.make_header(
            kind,
            credential=credentials[seq % 2],
            worker=seq % 2,
            seq=seq,
            version=version,
            fingerprint=server.fingerprint,
            **fields,
        )
        return transport.encode(header, arrays)[0]

    pushes = 0
    for phase_seconds in (1.0, seconds):  # warm-up (compiles the apply), then timed
        start, first = time.perf_counter(), server.version
        while time.perf_counter() - start < phase_seconds:
            push = header_frame(
                "push", [grads], version=server.version, mean_abs_td=MEAN_ABS_TD, frames=0
            )
            server.handle([push, payload])
            pushes += 1
            if pushes % sync_every == 0:
                server.handle([header_frame("pull", version=-1)])
        jax.block_until_ready(server.params)
    if server.counters.rejections:  # the rate counts applied pushes only
        raise RuntimeError(f"handle() refused requests: {dict(server.counters.rejections)}")
    return (server.version - first) / (time.perf_counter() - start)


def benchmark(args: ParameterServerArgs) -> int:

    import jax
    import zmq

    from gorila_jax.core.config import Config
    from gorila_jax.core.networks import NatureCNN
    from gorila_jax.server.parameter_server import ParameterServer
    from gorila_jax.wire import transport
    from gorila_jax.wire.credentials import WorkerAuthority, new_run_secret, worker_credential

    config = dataclasses.replace(
        Config(), optimizer="adam", max_staleness=1_000_000, outlier_k=0.0, dc_asgd="off"
    )
    network = NatureCNN(num_actions=6)
    params = network.init(jax.random.key(0), np.zeros((1, 4, 84, 84), np.uint8))
    secret = new_run_secret()
    credentials = [worker_credential(secret, worker) for worker in range(2)]
    server = ParameterServer(
        config, params, num_workers=2, authority=WorkerAuthority(2, secret=secret)
    )
    num_params = server.num_params
    vector_bytes = num_params * 4

    # The server's per-push steps and the floor's parts, before any client runs (the floor's
    # parts again after the clients: the floor uses the mean of both medians).
    probe = _gradient(num_params, 99)
    costs = component_costs(server, probe, credentials[0])
    alone = ParameterServer(
        config, params, num_workers=2, authority=WorkerAuthority(2, secret=secret)
    )
    handle_pushes = handle_rate(alone, _gradient(num_params, 98), args.sync_every, 3.0, credentials)
    del alone
    bandwidths = [memory_bandwidth()]
    applies = [costs["apply"]]

    context = zmq.Context.instance()
    socket, endpoint = transport.make_server_socket(context, "tcp://127.0.0.1:0", MAX_BYTES)
    echo, echo_endpoint = transport.make_server_socket(context, "tcp://127.0.0.1:0", MAX_BYTES)
    stop_server = threading.Event()
    serving = threading.Thread(
        target=server.serve, args=(socket, endpoint, stop_server.is_set), daemon=True
    )
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    processes = []

    def collect(kind: str, count: int, timeout: float = 120.0) -> dict:
        got = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                tag, worker, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"clients failed or timed out waiting for {kind}") from None
                continue
            if tag != kind:
                raise RuntimeError(f"expected {kind}, got {tag}")
            got[worker] = value
        return got

    serving.start()
    try:
        # Round trip: one client, nothing else running.
        echo_stop = threading.Event()
        echo_thread = threading.Thread(
            target=echo_server, args=(echo, server.host_params().copy(), echo_stop), daemon=True
        )
        echo_thread.start()
        client = spawn.Process(
            target=roundtrip_client,
            args=(
                endpoint,
                echo_endpoint,
                credentials[0],
                server.fingerprint,
                num_params,
                args.roundtrips,
                results,
            ),
        )
        processes.append(client)
        client.start()
        roundtrip_seconds, raw_seconds = collect("roundtrip", 1)[0]
        client.join()
        echo_stop.set()
        echo_thread.join()

        # Throughput: two clients pushing, pulling every sync_every pushes.
        events = {name: spawn.Event() for name in ("start", "timed", "stop")}
        processes.clear()
        for worker in range(2):
            processes.append(
                spawn.Process(
                    target=load_client,
                    args=(
                        worker,
                        endpoint,
                        credentials[worker],
                        server.fingerprint,
                        num_params,
                        args.sync_every,
                        events,
                        results,
                    ),
                )
            )
            processes[-1].start()
        collect("ready", 2)
        events["start"].set()
        time.sleep(args.warmup)
        events["timed"].set()
        start_version, start = server.version, time.perf_counter()
        time.sleep(args.seconds)
        end_version, end = server.version, time.perf_counter()
        events["stop"].set()
        clients = collect("load", 2)
        for process in processes:
            process.join()
    finally:
        stop_server.set()
        serving.join()
        for process in processes:
            if process.is_alive():
                process.terminate()
        socket.close(linger=0)
        echo.close(linger=0)

    applies.append(apply_seconds(server, probe))
    bandwidths.append(memory_bandwidth())
    guarded, plain = guarded_apply_seconds(server, probe)
    apply_mean = statistics.mean(applies)
    bandwidth = statistics.mean(bandwidths)
    copy_bytes = 2.0 * (vector_bytes + vector_bytes / args.sync_every)
    floor_seconds = apply_mean + copy_bytes / bandwidth

    value = (end_version - start_version) / (end - start)
    floor = 1.0 / floor_seconds
    mb = 1024 * 1024
    print(f"devices: {jax.local_device_count()} ({jax.devices()[0].platform})")
    print(
        f"model: Nature CNN, {num_params:,} params ({vector_bytes / mb:.2f} MiB), adam, "
        f"max_grad_norm {config.max_grad_norm}; 2 clients, pull every {args.sync_every} pushes"
    )
    print(
        "server steps per push (ms, in-process medians): "
        + ", ".join(f"{name} {seconds * 1e3:.3f}" for name, seconds in costs.items())
    )
    print(
        f"server.handle() alone, no sockets: {handle_pushes:.1f} pushes/s "
        f"({1e3 / handle_pushes:.3f} ms per push)"
    )
    print(
        f"floor per push: apply {apply_mean * 1e3:.3f} ms (before/after "
        f"{'/'.join(f'{a * 1e3:.3f}' for a in applies)}) + copies {copy_bytes / mb:.2f} MiB "
        f"at {bandwidth / 1e9:.2f} GB/s (before/after "
        f"{'/'.join(f'{b / 1e9:.2f}' for b in bandwidths)}) "
        f"{copy_bytes / bandwidth * 1e3:.3f} ms = {floor_seconds * 1e3:.3f} ms"
    )
    rejected = dict(server.counters.rejections)
    print(
        f"server: {end_version - start_version} updates in {end - start:.2f} s, "
        f"rejections {rejected or 'none'}, staleness {dict(server.counters.staleness)}"
    )
    for worker, timed in sorted(clients.items()):
        pushes, pulls = timed["pushes"], timed["pulls"]
        print(
            f"client {worker}: {pushes} pushes ({timed['accepted']} accepted), "
            f"push {timed['push_s'] / max(pushes, 1) * 1e3:.2f} ms, "
            f"{pulls} pulls, pull {timed['pull_s'] / max(pulls, 1) * 1e3:.2f} ms (means)"
        )
    print(
        f"roundtrip_ms value={roundtrip_seconds * 1e3:.4g} floor={raw_seconds * 1e3:.4g} "
        f"ratio={roundtrip_seconds / raw_seconds:.4g} "
        "(push + pull through the server vs one raw zmq round trip of the same bytes; "
        "lower is better)"
    )
    print("ps_push ratio is value/floor: higher is better, goal >= 0.7")
    print(result_line("ps_push", value, floor))
    print(
        "guarded_apply: ms per push of the server's apply with its guard (norm check on "
        "arrival) against the plain donated Adam apply; lower is better, goal <= 1.2"
    )
    print(result_line("guarded_apply", guarded * 1e3, plain * 1e3))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the benchmark; the exit status."""
    return cli.run(benchmark, ParameterServerArgs, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
