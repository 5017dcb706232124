"""The local launcher: a server and bundles as real processes, and none left behind."""

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zmq

from gorila_jax.wire import credentials, transport

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "experiments" / "cartpole.py")
pytestmark = pytest.mark.slow


def start_local_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, CARTPOLE, "--run-dir", str(run_dir), "--log-every-seconds", "1", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_children(launcher: subprocess.Popen, count: int, run_dir: Path) -> list:
    """Wait until the server is up (ps.json) and all `count` children exist."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        children = psutil.Process(launcher.pid).children()
        if len(children) == count and (run_dir / "ps.json").exists():
            return children
        assert launcher.poll() is None, launcher.communicate(timeout=60)
        time.sleep(0.2)
    raise AssertionError("the run did not start in time")


def assert_all_gone(processes: list) -> None:
    _gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


def process_index(process: psutil.Process) -> int:
    """The run index the launcher gave the child; -1 for a child caught between fork and
    exec, which still has the launcher's own environment."""
    return int(process.environ().get("GORILA_PROCESS_ID", -1))


def test_success_leaves_no_process(tmp_path):
    launcher = start_local_run(tmp_path, "--total-frames", "3000", "--learning-starts", "400")
    children = wait_for_children(launcher, 3, tmp_path)
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, err
    assert "[server] INFO: done" in out and "[bundle 1] INFO: done" in out
    assert "[bundle 2] INFO: done" in out
    assert_all_gone(children)
    stats = json.loads((tmp_path / "ps.json").read_text())
    assert stats["updates"] > 0
    assert (tmp_path / "params.msgpack").exists()


def test_ctrl_c_stops_every_process(tmp_path):
    """And (issue 20.4) the launcher hands the run secret to the server alone and each
    bundle its own worker's credential, nothing that could act for another bundle."""
    launcher = start_local_run(tmp_path, "--total-frames", "10000000")
    children = wait_for_children(launcher, 3, tmp_path)
    environs = {process_index(child): child.environ() for child in children}
    secret = environs[0]["GORILA_RUN_SECRET"]
    assert "GORILA_WORKER_CREDENTIAL" not in environs[0]
    for index in (1, 2):
        assert "GORILA_RUN_SECRET" not in environs[index]
        own = environs[index]["GORILA_WORKER_CREDENTIAL"]
        assert own == credentials.worker_credential(secret, index - 1)
        assert secret not in environs[index].values()
    assert environs[1]["GORILA_WORKER_CREDENTIAL"] != environs[2]["GORILA_WORKER_CREDENTIAL"]
    time.sleep(2)
    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    _out, err = launcher.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert launcher.returncode == 130
    assert "stopping" in err
    assert_all_gone(children)


def gone_or_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def listening_ports(process: psutil.Process) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        connections = process.net_connections(kind="inet")
        return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return set()


def describe(process: psutil.Process) -> str:
    """Pid, index and state of a process, for a failure message."""
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} (index {process_index(process)}, {process.status()})"
    return str(process.pid)


def freeze_the_server_after_the_rendezvous(launcher: subprocess.Popen) -> psutil.Process:
    """SIGSTOP the server once the coordinator it hosts has closed (every process has the
    server's address and left jax.distributed) and before it answers: the bundles wait for
    a reply that will not come."""
    deadline = time.monotonic() + 90
    coordinator = None  # the first port the server listens on
    while time.monotonic() < deadline and launcher.poll() is None:
        server = next(
            (p for p in psutil.Process(launcher.pid).children() if process_index(p) == 0), None
        )
        ports = set() if server is None else listening_ports(server)
        if coordinator is None and ports:
            coordinator = min(ports)  # (the zmq socket, if already bound, came later)
        if coordinator is not None and ports and coordinator not in ports:
            server.suspend()
            return server
        time.sleep(0.01)
    raise AssertionError("did not see the server leave jax.distributed")


@pytest.mark.parametrize("moment", ["starting", "training", "waiting_for_a_dead_server"])
def test_every_process_is_gone_soon_after_the_launcher_is_killed(tmp_path, moment):
    """SIGKILL to the launcher, whatever its processes are doing (joining the run, training,
    waiting for a server that is gone): all of them are gone within 30 s."""
    launcher = start_local_run(
        tmp_path, "--total-frames", "10000000", "--learning-starts", "300",
        "--server-timeout-seconds", "300", "--stats-every-seconds", "0.5",
    )  # fmt: skip
    processes = []
    try:
        if moment == "starting":
            deadline = time.monotonic() + 60
            while len(psutil.Process(launcher.pid).children()) < 3:
                assert time.monotonic() < deadline and launcher.poll() is None
                time.sleep(0.05)
            time.sleep(1.0)  # joining jax.distributed
            assert not (tmp_path / "ps.json").exists()
        elif moment == "training":
            wait_for_children(launcher, 3, tmp_path)
            deadline = time.monotonic() + 120
            while json.loads((tmp_path / "ps.json").read_text())["updates"] < 20:
                assert time.monotonic() < deadline and launcher.poll() is None
                time.sleep(0.25)
        processes = psutil.Process(launcher.pid).children(recursive=True)
        if moment == "waiting_for_a_dead_server":
            server = freeze_the_server_after_the_rendezvous(launcher)
            processes = psutil.Process(launcher.pid).children(recursive=True)
            time.sleep(3.0)  # the bundles build their learners and say hello
            server.kill()
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while not all(gone_or_zombie(p) for p in processes):
            alive = [describe(p) for p in processes if not gone_or_zombie(p)]
            assert time.monotonic() - killed < 30, f"still running 30 s later: {alive}"
            time.sleep(0.2)
    finally:
        for process in processes:  # orphans are no longer the test's children
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_every_socket_of_a_local_run_listens_on_loopback_only(tmp_path):
    """The jax.distributed coordinator (while the processes join) and the server's socket."""
    launcher = start_local_run(tmp_path, "--total-frames", "10000000")
    listening: set[tuple[str, int]] = set()
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "ps.json").exists():
            assert time.monotonic() < deadline and launcher.poll() is None
            for child in psutil.Process(launcher.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    for connection in child.net_connections(kind="inet"):
                        if connection.status == psutil.CONN_LISTEN:
                            listening.add((connection.laddr.ip, connection.laddr.port))
            time.sleep(0.02)
        address = json.loads((tmp_path / "ps.json").read_text())["address"]
        server_port = int(address.rsplit(":", 1)[1])
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=60)
    ports = {port for _, port in listening}
    assert server_port in ports and len(ports) >= 2, listening  # the coordinator was seen
    assert all(is_loopback(ip) for ip, _ in listening), listening


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_a_curve_run_trains_and_lets_in_no_peer_without_a_key(tmp_path):
    launcher = start_local_run(
        tmp_path, "--total-frames", "10000000", "--learning-starts", "300",
        "--wire-security", "curve", "--stats-every-seconds", "0.5",
    )  # fmt: skip
    try:
        wait_for_children(launcher, 3, tmp_path)
        deadline = time.monotonic() + 120
        while (stats := json.loads((tmp_path / "ps.json").read_text()))["updates"] < 30:
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.25)
        # With CURVE nobody holds a credential or the run secret: a process's key is its
        # identity, and the launcher hands out nothing else.
        for child in psutil.Process(launcher.pid).children():
            environ = child.environ()
            assert "GORILA_RUN_SECRET" not in environ and "GORILA_WORKER_CREDENTIAL" not in environ
        # A peer without an admitted CURVE key gets nothing in.
        context = zmq.Context.instance()
        for curve in (None, transport.ClientCurve(*zmq.curve_keypair(), zmq.curve_keypair()[0])):
            peer = transport.make_client_socket(
                context, stats["address"], None, 1 << 20, curve=curve
            )
            header = transport.make_header(
                "hello", credential="", worker=0, seq=2**62, version=-1, fingerprint=""
            )
            # Not queued at all is as good as unanswered: zmq drops a refused connection,
            # and a blocking send on a DEALER without one would wait forever.
            with contextlib.suppress(zmq.Again):
                transport.send(peer, transport.encode(header), flags=zmq.NOBLOCK)
            assert not peer.poll(2000), "a peer without a CURVE key got an answer"
            peer.close(linger=0)
        later = json.loads((tmp_path / "ps.json").read_text())
        assert later["rejections"].get("bad_fingerprint", 0) == 0  # it never reached the server
    finally:
        launcher.send_signal(signal.SIGINT)
        _out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, err[-2000:]


def run_program(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def accepted(run_dir: Path, worker: int) -> int:
    try:
        stats = json.loads((run_dir / "ps.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(stats["workers"].get(str(worker), {}).get("accepted", 0))


def test_a_bundle_joins_a_running_local_job_and_leaves_it_without_stopping_it(tmp_path):
    """A local job of 1 bundle with room for 2 (--max-bundles 2): `cartpole.py --join
    RUN_DIR` becomes bundle 2, its pushes are accepted beside bundle 1's and ps.json lists
    it; a third bundle is turned away (full), so is the Pong program (another env) and a
    directory with no job; SIGTERM takes the joined bundle out and the job goes on."""
    launcher = start_local_run(
        tmp_path, "--workers", "1", "--max-bundles", "2", "--total-frames", "10000000",
        "--learning-starts", "300", "--stats-every-seconds", "0.5",
    )  # fmt: skip
    joiner = None
    try:
        wait_for_children(launcher, 2, tmp_path)
        deadline = time.monotonic() + 120
        while not (tmp_path / "join.json").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "no join file"
            time.sleep(0.25)
        assert (tmp_path / "join.json").stat().st_mode & 0o077 == 0
        joiner = subprocess.Popen(
            [sys.executable, CARTPOLE, "--join", str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while accepted(tmp_path, 1) < 20:
            assert time.monotonic() < deadline + 120, "the joined bundle's pushes never came"
            assert joiner.poll() is None, joiner.communicate(timeout=60)
            time.sleep(0.5)
        stats = json.loads((tmp_path / "ps.json").read_text())
        assert stats["joined"] == [1] and stats["launched"] == 1, stats
        assert stats["workers"]["0"]["accepted"] > 0
        refusals = {
            "is full": run_program("cartpole.py", "--join", str(tmp_path)),
            "trains CartPole-v1, this program Pong-v5": run_program(
                "pong.py", "--join", str(tmp_path)
            ),
            "no running job in": run_program("cartpole.py", "--join", str(tmp_path / "none")),
        }
        for complaint, refused in refusals.items():
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 2 and complaint in lines[-1], refused.stderr[-2000:]
            assert "Traceback" not in refused.stderr, refused.stderr[-2000:]
        joiner.send_signal(signal.SIGTERM)
        _out, err = joiner.communicate(timeout=90)
        assert joiner.returncode == 143, err[-2000:]  # 128 + SIGTERM: stopped as told
        assert "[bundle 2] INFO: joined the job" in err, err[-2000:]
        time.sleep(2.0)
        before = accepted(tmp_path, 0)
        deadline = time.monotonic() + 30  # a loaded machine's push and ps.json can be slow
        while accepted(tmp_path, 0) <= before:
            assert launcher.poll() is None, "the job stopped with its joined bundle"
            assert time.monotonic() < deadline, "bundle 1 stopped pushing"
            time.sleep(0.5)
        assert launcher.poll() is None, "the job stopped with its joined bundle"
        stats = json.loads((tmp_path / "ps.json").read_text())
        shown = {k: stats[k] for k in ("joined", "stopped_workers", "workers", "rejections")}
        assert stats["joined"] == [] and 1 in stats["stopped_workers"], (shown, err[-3000:])
    finally:
        if joiner is not None and joiner.poll() is None:
            joiner.kill()
            joiner.communicate(timeout=60)
        launcher.send_signal(signal.SIGINT)
        _out, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 130, err[-2000:]
    assert not (tmp_path / "join.json").exists(), "the join file outlived the job"


# ---- what the launcher says of a process that died ---------------------------------------

# The last lines of a sync bundle that jax.distributed ended after the run was suspended
# for 45 s (captured from such a run; the stack trace is shortened).
JAX_DISTRIBUTED_ABORT = [
    "E1203 19:38:48.067345   12866 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).",
    "F1203 19:38:48.091933   12866 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors. This most likely indicates that another task "
    "died; see the other task logs for more details. absl::Status: UNAVAILABLE: The following "
    "tasks are unhealthy (stopped sending heartbeats):",
    "0",
    "1",
    "The tasks have crashed. Check the task logs for an earlier error, or scheduler events "
    "(e.g. preemption, eviction) to debug further.",
    "RPC: /xla.coordination.CoordinationService/PollForError "
    "[type.googleapis.com/tensorflow.CoordinationServiceError='']",
]


HEARTBEAT_STATUS = (
    "fatal error: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats)"
)


def test_the_telling_line_of_a_native_abort_is_its_fatal_status():
    from gorila_jax.run.launcher import telling_line

    assert telling_line(JAX_DISTRIBUTED_ABORT) == HEARTBEAT_STATUS
    check_failed = "F0102 03:04:05.678901 42 shape_util.cc:9] Check failed: rank == 2"
    assert telling_line(["starting", check_failed, "*** Check failure stack trace: ***"]) == (
        "fatal error: Check failed: rank == 2"
    )
    progress = "frames 764/3,000 | sps 18 | eta 2m05s"
    glued = [*JAX_DISTRIBUTED_ABORT[:1], progress + JAX_DISTRIBUTED_ABORT[1]]
    assert telling_line(glued + JAX_DISTRIBUTED_ABORT[2:]) == HEARTBEAT_STATUS, (
        "a fatal line written before a Python line's newline is still found"
    )
    python = ["Traceback (most recent call last):", '  File "x.py"', "ValueError: bad", "bye"]
    assert telling_line(python) == "ValueError: bad"
    assert telling_line(["one", "two"]) == "two"
    assert telling_line([]) == "(no output)"


def last_error_of_aborting_child(lines: list[str]) -> str:
    """The launcher's last error for a child that prints `lines` and aborts."""
    from gorila_jax.run.launcher import Child

    script = f"import os\nfor line in {lines!r}:\n    print(line)\nos.abort()"
    child = Child("bundle 2", [sys.executable, "-c", script], dict(os.environ))
    assert child.process.wait(timeout=30) == -signal.SIGABRT
    child.finish_output()
    return child.last_error()


def test_a_native_stack_trace_does_not_hide_why_a_child_died():
    """A child that prints jax.distributed's fatal lines, then a native stack trace longer
    than the lines the launcher keeps, and aborts: its last error is still the fatal
    status, not a frame of the trace (what the launcher said before)."""
    from gorila_jax.run.launcher import KEPT_LINES

    trace = ["*** Check failure stack trace: ***"] + [
        f"    @     0x7ff3e89{frame:05x}  xla::CoordinationServiceAgent::SetError()"
        for frame in range(KEPT_LINES + 10)
    ]
    assert last_error_of_aborting_child(JAX_DISTRIBUTED_ABORT + trace) == HEARTBEAT_STATUS


def test_lines_printed_between_a_fatal_status_and_the_abort_do_not_hide_it():
    """A child whose other threads go on printing (progress, replay checkpoints) for a
    while after jax.distributed's fatal status, before the abort lands: its last error is
    still the status, not the RPC line that ends it (what CI once saw)."""
    chatter = [f"frames {frame}/3,000 | sps 18 | eta 2m05s" for frame in range(60)]
    assert last_error_of_aborting_child(JAX_DISTRIBUTED_ABORT + chatter) == HEARTBEAT_STATUS
