"""End-to-end runs under a real SLURM: `srun -n 3` of the CartPole script, `srun -n 5` of it with
the server split in 2 shards, and the Pong sbatch example submitted with `sbatch --wait`,
requeued, and suspended and resumed.

Every process logs `[<process>] LEVEL: message` (gorila_jax.io.logs): `[server]` (or `[shard k]`
of a server in S shards, tasks 0..S-1) and `[bundle i]` (task S+i-1), so a finished run
says `[server] INFO: done: ...`, `[shard 0] INFO: done: ...`, `[bundle 1] INFO: done: ...`.

They skip, saying why, where SLURM is not installed and running with an idle node, and fail
instead where GORILA_REQUIRE_SLURM=1 says it must be there (.ci/run sets it on a root machine
with apt-get, after starting SLURM). On a Debian machine as root,
`bash .ci/slurm.sh install start` sets up a one-node SLURM for them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "experiments" / "slurm" / "pong.sbatch"
SRUN_TIMEOUT_SECONDS = 240
SBATCH_TIMEOUT_SECONDS = 480
START_HINT = "start it with: bash .ci/slurm.sh install start"
REQUIRE_SLURM = "GORILA_REQUIRE_SLURM"  # "1": a missing SLURM fails these tests

pytestmark = pytest.mark.slow


@functools.cache
def _node_unavailable() -> str | None:
    """Why no SLURM node can take a job now, or None. Asked once per session: sinfo retries
    for several seconds when no controller answers."""
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return f"SLURM is not answering (sinfo timed out): {START_HINT}"
    states = result.stdout.split()
    if result.returncode != 0 or not states:
        reason = result.stderr.strip().splitlines()[-1:] or ["no node"]
        return f"SLURM is not running here ({reason[0]}): {START_HINT}"
    if not any(state in ("idle", "mixed") for state in states):
        return f"no SLURM node is idle (states: {', '.join(states)}); {START_HINT}"
    return None


def _require_slurm(*tools: str) -> None:
    """Skip unless the SLURM tools are here and the node can take a job now; fail instead
    when REQUIRE_SLURM is set to 1 (.ci/run on a machine that should have SLURM)."""
    missing = [tool for tool in ("sinfo", *tools) if shutil.which(tool) is None]
    if missing:
        reason = f"SLURM is not installed here ({', '.join(missing)} not on PATH): {START_HINT}"
    else:
        reason = _node_unavailable()
    if reason and os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{REQUIRE_SLURM}=1 but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _job_name(test: str) -> str:
    """A name unique to this run, so a job left behind by a timeout can be cancelled."""
    return f"gorila-{test}-{uuid.uuid4().hex[:8]}"


def _cancel(job_name: str) -> None:
    subprocess.run(["scancel", "--name", job_name], capture_output=True, timeout=30)


def _read_ps(run_dir: Path, output: str) -> dict:
    ps_path = run_dir / "ps.json"
    assert ps_path.is_file(), f"no {ps_path}; output:\n{_tail(output)}"
    return json.loads(ps_path.read_text())


def _srun_cartpole(run_dir: Path, tasks: int, *extra: str) -> str:
    """`srun -n tasks -l` of experiments/cartpole.py with tiny settings; its output, once it
    has exited 0 (the test fails otherwise, and a job left running is cancelled)."""
    job_name = _job_name(f"srun{tasks}")
    command = [
        "srun",
        "-n",
        str(tasks),
        "-l",
        f"--job-name={job_name}",
        sys.executable,
        "experiments/cartpole.py",
        "--total-frames",
        "6000",
        "--run-dir",
        str(run_dir),
        "--learning-starts",
        "500",
        "--log-every-seconds",
        "2",
        *extra,
    ]
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SRUN_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        _cancel(job_name)
        pytest.fail(f"srun ran past {SRUN_TIMEOUT_SECONDS}s; output:\n{_tail(error.stdout)}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"srun exited {result.returncode}:\n{_tail(output)}"
    return output


def _assert_done(output: str, task: int, process: str) -> None:
    """srun -l prefixes each line with its task number: `<task>: [<process>] INFO: done: ...`."""
    prefix = f"{task}: [{process}] INFO: done"
    assert any(line.startswith(prefix) for line in output.splitlines()), (
        f"no line starting {prefix!r}:\n{_tail(output)}"
    )


@pytest.mark.parametrize("required", [False, True])
def test_a_missing_slurm_skips_unless_it_is_required(monkeypatch, required):
    """Needs no SLURM. Catches a GORILA_REQUIRE_SLURM that is not honoured (CI green with
    every SLURM test skipped on a machine that should run them) and a skip without its
    reason (the summary shows skip reasons: -ra)."""
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    if required:
        monkeypatch.setenv(REQUIRE_SLURM, "1")
        with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_SLURM}=1 but SLURM is not"):
            _require_slurm("srun")
    else:
        monkeypatch.delenv(REQUIRE_SLURM, raising=False)
        with pytest.raises(pytest.skip.Exception, match=r"sinfo, srun not on PATH.*slurm\.sh"):
            _require_slurm("srun")


def _watch_listening(run_dir: Path, seen: set, done: threading.Event) -> None:
    """Until `done`: every (address, port) a task of the run in `run_dir` listens on,
    sampled every 0.1 s (the jax.distributed coordinator listens only until the rendezvous
    is over)."""
    import psutil

    while not done.is_set():
        for process in psutil.process_iter(["cmdline"]):
            try:
                command = process.info["cmdline"] or []
                # The run's own processes (srun's I/O sockets are SLURM's, not the run's).
                if not command or command[0] != sys.executable or str(run_dir) not in command:
                    continue
                for socket in process.net_connections(kind="tcp"):
                    if socket.status == psutil.CONN_LISTEN:
                        seen.add((socket.laddr.ip, socket.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)


def test_srun_three_tasks_trains_cartpole(tmp_path):
    """srun -n 3: task 0 serves the params, tasks 1 and 2 push accepted gradients; the run
    secret is RUN_DIR/run_secret, readable by its owner only (no GORILA_RUN_SECRET set), and
    nothing of the run listens on every interface: the rendezvous store and the server
    each on one address (issue 20.6; jax's default store listens on [::])."""
    _require_slurm("srun")
    run_dir = tmp_path / "run"
    seen: set = set()
    done = threading.Event()
    watcher = threading.Thread(target=_watch_listening, args=(run_dir, seen, done), daemon=True)
    watcher.start()
    try:
        output = _srun_cartpole(run_dir, 3)
    finally:
        done.set()
        watcher.join(timeout=10)
    assert len({port for _, port in seen}) >= 2, seen  # the store and the server were seen
    assert not {ip for ip, _ in seen} & {"0.0.0.0", "::", ""}, seen
    assert (run_dir / "run_secret").stat().st_mode & 0o077 == 0

    ps = _read_ps(run_dir, output)
    assert ps["updates"] > 0, ps
    assert ps["num_workers"] == 2, ps
    for worker in ("0", "1"):
        assert ps["workers"][worker]["accepted"] > 0, (worker, ps["workers"])
    assert (run_dir / "params.msgpack").is_file()
    _assert_done(output, 0, "server")
    for task in (1, 2):
        _assert_done(output, task, f"bundle {task}")


def test_srun_two_tasks_in_sync_mode_step_together(tmp_path):
    """srun -n 2 --mode sync: no server, both tasks bundles of one jax.distributed group
    (gloo collectives across the tasks), each stepping its half of the frames; every
    update taken by both (the same count), the params written once by task 0."""
    _require_slurm("srun")
    run_dir = tmp_path / "run"
    output = _srun_cartpole(run_dir, 2, "--mode", "sync")

    updates = {}
    for task in (0, 1):
        _assert_done(output, task, f"bundle {task + 1}")
        done = next(
            line for line in output.splitlines() if line.startswith(f"{task}: [bundle")
            and "INFO: done:" in line
        )  # fmt: skip
        updates[task] = int(done.split(" frames, ")[1].split(" updates")[0].replace(",", ""))
    assert updates[0] == updates[1] > 0, updates
    assert (run_dir / "params.msgpack").is_file()
    assert not (run_dir / "ps.json").exists()  # no server


def _answers_a_plain_peer(run_dir: Path, found: dict) -> None:
    """Once the server has written ps.json, send it a request over a socket without CURVE
    keys; `found["answered"]`: whether any reply came within 3 s (a server without CURVE
    answers even a wrong credential, with an error)."""
    import zmq

    from gorila_jax.wire import transport

    deadline = time.monotonic() + SRUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            address = json.loads((run_dir / "ps.json").read_text())["address"]
            break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.2)
    else:
        return
    peer = transport.make_client_socket(zmq.Context.instance(), address, None, 1 << 20)
    try:
        header = transport.make_header(
            "hello", credential="x" * 64, worker=0, seq=2**62, version=-1, fingerprint=""
        )
        # A DEALER whose connection zmq dropped (the refused handshake) would wait forever
        # to queue: not queued is as unanswered as no reply.
        with contextlib.suppress(zmq.Again):
            transport.send(peer, transport.encode(header), flags=zmq.NOBLOCK)
        found["answered"] = bool(peer.poll(3000))
    finally:
        peer.close(linger=0)


def test_srun_three_tasks_trains_cartpole_over_curve(tmp_path):
    """srun -n 3 with --wire-security curve: the CURVE public keys go through jax.distributed's
    store (not the local launcher's environment), both bundles' pushes are accepted, and
    while it runs a peer without CURVE keys gets no answer at all. Catches a CURVE path that
    only works under the local launcher (a bundle that never gets the server's key, or a
    server that admits none of the bundles' keys: the run hangs or its pushes are refused),
    and a --wire-security curve that is parsed but leaves the socket in clear under SLURM."""
    _require_slurm("srun")
    run_dir = tmp_path / "run"
    found: dict = {}
    probe = threading.Thread(target=_answers_a_plain_peer, args=(run_dir, found), daemon=True)
    probe.start()
    output = _srun_cartpole(run_dir, 3, "--wire-security", "curve")
    probe.join(timeout=10)

    ps = _read_ps(run_dir, output)
    assert ps["updates"] > 0 and ps["num_workers"] == 2, ps
    for worker in ("0", "1"):
        assert ps["workers"][worker]["accepted"] > 0, (worker, ps["workers"])
    assert found == {"answered": False}, "a peer without CURVE keys got an answer (or no probe)"
    _assert_done(output, 0, "server")
    for task in (1, 2):
        _assert_done(output, task, f"bundle {task}")


def test_srun_two_shards_an_aggregator_and_three_bundles_train_cartpole(tmp_path):
    """srun -n 6 with --server-shards 2 --aggregate-per-host: tasks 0 and 1 are the
    server's shards, each applying pushes to its slice; task 2 is the node's aggregator,
    the shards' one worker; tasks 3, 4 and 5 are bundles 1 to 3, every one pushing to the
    aggregator, which forwards to both shards."""
    _require_slurm("srun")
    run_dir = tmp_path / "run"
    output = _srun_cartpole(run_dir, 6, "--server-shards", "2", "--aggregate-per-host")

    ps = _read_ps(run_dir, output)
    assert ps["server_shards"] == 2, ps
    assert len(ps["shards"]) == 2, ps
    for shard, stats in enumerate(ps["shards"]):
        assert stats["server_shard"] == shard, stats
        assert stats["version"] > 0, (shard, stats)
        assert (run_dir / f"shard{shard}" / "ps.json").is_file()
        assert (run_dir / f"shard{shard}" / "params_slice.msgpack").is_file()
    assert ps["num_workers"] == 1 and ps["workers"]["0"]["accepted"] > 0, ps
    hub = json.loads((run_dir / "aggregator1.json").read_text())
    assert all(hub["received"][w] > 0 for w in ("0", "1", "2")), hub
    assert "aggregator 1 on" in output, _tail(output)
    assert not (run_dir / "params.msgpack").exists()  # the slices are the params
    for shard in (0, 1):
        _assert_done(output, shard, f"shard {shard}")
    _assert_done(output, 2, "aggregator 1")
    for bundle in (1, 2, 3):
        _assert_done(output, bundle + 2, f"bundle {bundle}")


def test_pong_sbatch_example_runs(tmp_path):
    """experiments/slurm/pong.sbatch, as written, with tiny settings passed in GORILA_ARGS."""
    _require_slurm("sbatch")
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.out"
    tiny = (
        f"--run-dir {run_dir} --total-frames 2400 --learning-starts 1000 --num-envs 2 "
        "--replay-capacity 2000 --log-every-seconds 5"
    )
    job_name = _job_name("sbatch")
    command = [
        "sbatch",
        "--wait",
        f"--job-name={job_name}",
        f"--output={log_path}",
        str(SBATCH_SCRIPT),
    ]
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "GORILA_ARGS": tiny},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SBATCH_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        _cancel(job_name)
        job_log = log_path.read_text() if log_path.exists() else "(no job output yet)"
        pytest.fail(
            f"sbatch --wait ran past {SBATCH_TIMEOUT_SECONDS}s; job output:\n{_tail(job_log)}"
        )
    job_log = log_path.read_text() if log_path.exists() else "(no job output)"
    assert result.returncode == 0, (
        f"sbatch exited {result.returncode}: {result.stderr.strip()}\njob output:\n{_tail(job_log)}"
    )
    ps = _read_ps(run_dir, job_log)
    assert ps["num_workers"] == 2, ps
    assert ps["frames"] > 0, ps
    assert ps["updates"] > 0, ps
    assert "[server] INFO: done" in job_log, _tail(job_log)


def _ps_now(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "ps.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for(condition, seconds: float, what: str, log_path: Path) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(2)
    job_log = log_path.read_text() if log_path.exists() else "(no job output)"
    pytest.fail(f"waited {seconds:.0f}s for {what}; job output:\n{_tail(job_log)}")


def _submit_cartpole_job(run_dir: Path, log_path: Path, test: str, extra: str) -> str:
    """Submit the sbatch example with an endless, small CartPole run (`extra` flags added),
    its output appended to `log_path` across requeues; its job id."""
    args = (
        f"--run-dir {run_dir} --env-id CartPole-v1 --total-frames 10000000 "
        f"--learning-starts 500 --num-envs 2 --replay-capacity 5000 --log-every-seconds 5 {extra}"
    )
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={_job_name(test)}", f"--output={log_path}",
         "--open-mode=append", str(SBATCH_SCRIPT)],
        cwd=ROOT, env={**os.environ, "GORILA_ARGS": args}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def test_a_requeued_job_stops_on_sigterm_and_resumes_from_its_checkpoints(tmp_path):
    """The sbatch example under `scontrol requeue` (what preemption or a node failure does
    with --requeue): SLURM sends SIGTERM to every task, the server writes its final
    checkpoint, the job comes back under the same id and every role resumes: the server
    from that checkpoint (no update lost), the bundles from their replays. Catches a SIGTERM
    that loses the last updates, a requeued run that starts afresh, and a resume that
    forgets the run's counters."""
    _require_slurm("sbatch", "scontrol", "squeue", "scancel")
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.out"
    job_id = _submit_cartpole_job(run_dir, log_path, "requeue", "--checkpoint-every-seconds 2")
    try:
        _wait_for(
            lambda: _ps_now(run_dir).get("checkpointed_version", -1) > 200,
            SBATCH_TIMEOUT_SECONDS, "a first checkpoint", log_path,
        )  # fmt: skip
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        stopped = _wait_for(
            lambda: "[server] INFO: stopped" in log_path.read_text() and _ps_now(run_dir),
            120, "the server to stop on SIGTERM", log_path,
        )  # fmt: skip
        assert stopped["checkpointed_version"] == stopped["version"]  # nothing unsaved

        # A requeued job may wait a while (BeginTime, about 2 minutes on some machines)
        # before it runs again: ask for now each time round (the update fails, harmlessly,
        # where the job is still completing or already runs again) until it runs.
        def running_again() -> bool:
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                capture_output=True, timeout=30,
            )  # fmt: skip
            state = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                timeout=30,
            ).stdout.strip()  # fmt: skip
            return state == "RUNNING"

        _wait_for(running_again, 300, "the requeued job to start again", log_path)
        resumed = _wait_for(
            lambda: (ps := _ps_now(run_dir)).get("events", {}).get("resumed") == 1
            and ps.get("version", 0) > stopped["version"]
            and ps,
            SBATCH_TIMEOUT_SECONDS, "the resumed server to apply updates", log_path,
        )  # fmt: skip
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    job_log = log_path.read_text()
    assert f"[server] INFO: resumed from checkpoint {stopped['version']}" in job_log
    assert job_log.count("resumed its replay from") == 2, _tail(job_log)
    assert resumed["frames"] > stopped["frames"] > 0


def test_a_suspended_job_goes_on_without_losing_the_server(tmp_path):
    """The sbatch example under `scontrol suspend` (every task stopped) for twice the
    server timeout, then `scontrol resume`: the bundles leave the suspended time out of
    their waits for the server, so none takes it for lost or reconnects, and the server
    goes on applying their pushes."""
    _require_slurm("sbatch", "scontrol", "squeue", "scancel")
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.out"
    job_id = _submit_cartpole_job(run_dir, log_path, "suspend", "--server-timeout-seconds 8")
    try:
        _wait_for(
            lambda: _ps_now(run_dir).get("version", 0) > 200,
            SBATCH_TIMEOUT_SECONDS, "updates before the suspension", log_path,
        )  # fmt: skip
        subprocess.run(["scontrol", "suspend", job_id], check=True, timeout=30)
        time.sleep(16)
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
            timeout=30,
        ).stdout.strip()  # fmt: skip
        subprocess.run(["scontrol", "resume", job_id], check=True, timeout=30)
        assert state == "SUSPENDED", state
        suspended_at = _ps_now(run_dir)["version"]
        _wait_for(
            lambda: _ps_now(run_dir).get("version", 0) > suspended_at + 300,
            120, "updates after the resume", log_path,
        )  # fmt: skip
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    job_log = log_path.read_text()
    assert "lost the server" not in job_log and "reconnected" not in job_log, _tail(job_log)
    gaps = re.findall(r"\[bundle \d\] INFO: did not run for (\d+)s \(suspended", job_log)
    assert any(10 <= int(gap) <= 60 for gap in gaps), (gaps, _tail(job_log))  # the 16 s stop
