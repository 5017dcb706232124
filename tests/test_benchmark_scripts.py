"""The benchmark scripts keep up with the library: each parses its flags, the quick ones run.

Timings are not asserted (they are benchmarks, not tests); what is asserted is that a script
still runs against today's API and ends with a well-formed RESULT line, so a benchmark does
not silently rot when a signature changes (replay_checkpoint.py once did). The server
benchmarks that take minutes are not run whole: what they send a server is, in process.
"""

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.name for path in (ROOT / "benchmarks").glob("*.py") if path.name != "common.py"
)
RESULT = re.compile(r"^RESULT (\w+) value=(\S+) floor=(\S+) ratio=(\S+)$", re.MULTILINE)


def run_script(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_a_bad_flag(name):
    shown = run_script(name, "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "usage:" in shown.stdout
    bad = run_script(name, "--no-such-flag")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr[-2000:]


@pytest.mark.parametrize(
    "name, args",
    [
        ("replay.py", ("2000",)),
        ("replay_checkpoint.py", ("--capacity", "800", "--repeats", "2")),
        (
            "aggregator.py",
            ("--bundles", "2", "--seconds", "1", "--warmup", "0.5", "--repeats", "1"),
        ),
        (
            "across_hosts.py",
            ("--loopback-only", "--pushes", "3", "--warmup", "1", "--repeats", "1"),
        ),
    ],
)
def test_a_quick_benchmark_prints_its_figure_next_to_its_floor(name, args, tmp_path):
    done = run_script(name, *args, cwd=tmp_path)  # scratch files land in tmp_path
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = RESULT.findall(done.stdout)
    assert results, done.stdout[-2000:]
    for _, value, floor, ratio in results:
        assert float(value) > 0 and float(floor) > 0
        assert float(ratio) == pytest.approx(float(value) / float(floor), rel=1e-2)
    # across_hosts.py: a push the server refused (a wire change the script missed) is cheap
    # and would still give a figure.
    assert set(re.findall(r"\brefused (\d+)", done.stdout)) <= {"0"}, done.stdout[-2000:]


@pytest.fixture
def import_benchmark(monkeypatch):
    """Import a benchmark script as a module (the scripts import `common` and each other
    from benchmarks/); modules of those names are put back as they were afterwards."""
    names = {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    yield importlib.import_module
    for name in names:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_what_the_server_benchmarks_send_a_server_accepts(import_benchmark):
    """parameter_server.py, sharded_server.py and many_bundles.py take minutes and are not
    run here: the requests they build (with `make_header`, or by hand in many_bundles.py),
    signed with each worker's credential, go to a server of today's protocol in process, so
    a wire change they miss fails here rather than in their next run."""
    import msgpack
    import numpy as np

    from gorila_jax.core.config import Config
    from gorila_jax.server.parameter_server import ParameterServer
    from gorila_jax.wire.credentials import WorkerAuthority, new_run_secret, worker_credential

    parameter_server = import_benchmark("parameter_server")
    sharded_server = import_benchmark("sharded_server")
    many_bundles = import_benchmark("many_bundles")
    across_hosts = import_benchmark("across_hosts")
    params = {"w": np.zeros(256, np.float32)}
    grads = np.full(256, 1e-3, np.float32)
    secret = new_run_secret()
    credentials = [worker_credential(secret, worker) for worker in range(2)]
    config = dataclasses.replace(Config(), outlier_k=0.0, max_staleness=1_000_000)

    def server() -> ParameterServer:
        authority = WorkerAuthority(2, secret=secret)
        return ParameterServer(config, params, num_workers=2, authority=authority)

    # parameter_server.py: its decode raises on a header the server refuses, its handle()
    # loop on any refusal.
    assert parameter_server.component_costs(server(), grads, credentials[0])["decode"] > 0
    assert parameter_server.handle_rate(server(), grads, 2, 0.1, credentials) > 0
    # sharded_server.py: handle() of shard 0 of 2 raises on any refusal; the sizes it prints.
    assert sharded_server.handle_cpu_per_push(params, 2, secret, seconds=0.1) > 0
    fingerprint = server().fingerprint
    push_bytes, ack_bytes = sharded_server.wire_bytes(secret, fingerprint, 128)
    assert push_bytes > 4 * 128 and ack_bytes > 0
    assert across_hosts.push_bytes(secret, fingerprint, 256) > 4 * 256
    # many_bundles.py: the headers its simulated bundles build by hand.
    served = server()

    def request(kind: str, seq: int, arrays=(), **fields) -> dict:
        header = many_bundles.request_header(
            kind, arrays=len(arrays), credential=credentials[1], worker=1, seq=seq,
            version=served.version, fingerprint=fingerprint, **fields,
        )  # fmt: skip
        reply = served.handle([header, *(array.tobytes() for array in arrays)])
        return msgpack.unpackb(bytes(reply[0]))

    assert request("hello", 1)["kind"] == "welcome"
    ack = request("push", 2, [grads], mean_abs_td=1.0, frames=0)
    assert ack["kind"] == "ack" and ack["accepted"], ack
    assert request("pull", 3)["kind"] != "error"
    assert served.version == 1 and not served.counters.rejections
