"""End-to-end runs across hosts: the CartPole script under a real SLURM of 2 hosts simulated on
this machine by .ci/cluster.sh (network namespaces h1, h2 with their own hostname, hosts file
and address in 198.18.0.0/24, a slurmctld on the login node `ctl`, a slurmd per host).

- `srun -N 2 -n 3`: the server on one host, a bundle on the other reaching it at the server
  host's own address; every role finishes and the bundles' pushes are accepted.
- `srun -N 2 -n 4 --ntasks-per-node=2 --distribution=cyclic --server-shards 2`: one shard per
  host, every role finishes.
- `srun -N 2 -n 4 --ntasks-per-node=2 --server-shards 2` (tasks packed per node): the
  shards still land one per host (tasks 0 and 2), and process 0 logs where each role went.
- the same with the run directory on each host's own disk (no shared file system): each
  host holds only its roles' files; collected into one directory, they are a whole run.
- partitions: shard 1 alone on a host whose link is cut for 15 s (shard 0 goes on at
  least half as fast, nobody takes it for lost, the run finishes); a bundle's host cut for
  45 s (the server and the other bundle go on, the cut bundle comes back by itself); a
  single server's host cut for 25 s (the bundles back off and resume against it).
- a bundle joins a running job from the other host (`--join RUN_DIR`) and leaves it.
- `sbatch --nodes 2 --wait` of a job script that sruns the CartPole script.

Each task first prints where it runs (`gorila-test: task T on HOST at ADDRESS`), then becomes
the CartPole script, whose processes log `[server]`, `[shard k]`, `[bundle i]` lines, ending in
`INFO: done: ...`. SLURM's tools run on the login node through `.ci/cluster.sh exec ctl`: the
machine's own network cannot reach the cluster's addresses.

A session fixture brings the cluster up and takes it down at the end whatever happens (one
that is already up, as .ci/run brings it up, is used and left up). The tests skip, saying why,
where no cluster can be built (not root, no `ip netns`, SLURM not installed: see
`bash .ci/cluster.sh check`), and fail instead where GORILA_REQUIRE_CLUSTER=1 says it must be
there (.ci/run sets it where it brought the cluster up).

The tasks of a run share its run directory here (every "host" sees this machine's files),
except in the test that puts it on each host's own disk (`/var/lib/gorila-cluster-local`,
a directory only that host sees).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from gorila_jax.wire import credentials

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / ".ci" / "cluster.sh"
LOGIN_HOST = "ctl"
REQUIRE_CLUSTER = "GORILA_REQUIRE_CLUSTER"  # "1": a cluster that cannot be had fails the tests
UP_TIMEOUT_SECONDS = 120
DOWN_TIMEOUT_SECONDS = 120
STEP_TIMEOUT_SECONDS = 240
BATCH_TIMEOUT_SECONDS = 300
# Tiny runs, as in tests/test_slurm.py (the cost is mostly each process's start-up).
TINY = ["--total-frames", "4000", "--learning-starts", "500", "--log-every-seconds", "2"]
# Run by each task before it execs the CartPole script: where it runs, in the task's output.
WHERE = 'echo "gorila-test: task $SLURM_PROCID on $(hostname) at $(hostname -i)"; exec "$0" "$@"'
WHERE_LINE = re.compile(r"^(\d+): gorila-test: task \1 on (\S+) at (\S+)\s*$")
DONE_LINE = re.compile(r"^(\d+): \[(server|shard \d+|bundle \d+)\] INFO: done: (.*)$")
LISTENING = re.compile(r"^(\d+): \[(server|shard \d+)\] INFO: .*listening on tcp://([\d.]+):\d+")

pytestmark = pytest.mark.slow


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _cluster_sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _why_no_cluster() -> str | None:
    """Why no cluster can be built here (`cluster.sh check`'s reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and SLURM daemons): run the tests as root"
    try:
        result = _cluster_sh("check")
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bash .ci/cluster.sh check did not answer: {error}"
    if result.returncode == 0:
        return None
    said = (result.stdout + result.stderr).strip().splitlines()
    if not said:
        return f"bash .ci/cluster.sh check exited {result.returncode}"
    return said[-1].removeprefix("cluster.sh: check: ").removeprefix("no cluster here: ")


def _skip_or_fail(reason: str | None) -> None:
    """Skip with `reason`; fail instead when REQUIRE_CLUSTER is 1 (.ci/run where the cluster
    came up): CI must not turn green with every multi-host test skipped."""
    if reason is None:
        return
    if os.environ.get(REQUIRE_CLUSTER) == "1":
        pytest.fail(f"{REQUIRE_CLUSTER}=1 but {reason}", pytrace=False)
    pytest.skip(f"no simulated cluster: {reason}")


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[str, ...]

    def command(self, *argv: str) -> list[str]:
        """argv run on the login node, with the cluster's SLURM_CONF."""
        return ["bash", str(CLUSTER_SH), "exec", LOGIN_HOST, *argv]

    def cancel(self, job_name: str) -> None:
        subprocess.run(self.command("scancel", "--name", job_name), capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def cluster():
    _skip_or_fail(_why_no_cluster())
    already_up = _cluster_sh("status").returncode == 0
    brought_up = False
    try:
        if not already_up:
            brought_up = True
            result = _cluster_sh("up", timeout=UP_TIMEOUT_SECONDS)
            if result.returncode != 0:
                pytest.fail(
                    f"bash .ci/cluster.sh up exited {result.returncode}:\n"
                    f"{_tail(result.stdout + result.stderr)}",
                    pytrace=False,
                )
        nodes = subprocess.run(
            Cluster(()).command("sinfo", "-h", "-N", "-o", "%N %T"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        states = dict(line.split() for line in nodes.stdout.splitlines() if line.strip())
        idle = tuple(sorted(host for host, state in states.items() if state == "idle"))
        if len(idle) < 2:
            _skip_or_fail(f"the cluster has {len(idle)} idle host(s), these tests need 2: {states}")
        yield Cluster(idle)
    finally:
        if brought_up:
            _cluster_sh("down", timeout=DOWN_TIMEOUT_SECONDS)


def _job_name(test: str) -> str:
    """A name unique to this run, so a job left behind by a timeout can be cancelled."""
    return f"gorila-multihost-{test}-{uuid.uuid4().hex[:8]}"


def _cartpole(run_dir: Path, *extra: str) -> list[str]:
    """Each task's command: say where it runs, then run the CartPole script."""
    script = ["experiments/cartpole.py", "--run-dir", str(run_dir), *TINY, *extra]
    return ["sh", "-c", WHERE, sys.executable, *script]


def _srun(
    cluster: Cluster,
    run_dir: Path,
    srun_flags: list[str],
    *extra: str,
    env: dict | None = None,
    expect_status: int = 0,
) -> str:
    """`srun -l` of the CartPole script on the cluster (with `env` added to the
    environment srun passes on); its output, once it exited `expect_status`."""
    job_name = _job_name("srun")
    command = cluster.command(
        "srun", "-l", f"--job-name={job_name}", *srun_flags, *_cartpole(run_dir, *extra)
    )
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        cluster.cancel(job_name)
        pytest.fail(f"srun ran past {STEP_TIMEOUT_SECONDS}s; output:\n{_tail(error.stdout)}")
    output = result.stdout + result.stderr
    assert result.returncode == expect_status, f"srun exited {result.returncode}:\n{_tail(output)}"
    return output


def _placement(output: str, tasks: int) -> dict[int, tuple[str, str]]:
    """Task -> (host, its address), from each task's `gorila-test:` line."""
    found = {}
    for line in output.splitlines():
        if match := WHERE_LINE.match(line):
            found[int(match[1])] = (match[2], match[3])
    said = f"tasks said where they ran: {found}\n{_tail(output)}"
    assert sorted(found) == list(range(tasks)), said
    return found


def _assert_on_two_hosts(cluster: Cluster, where: dict[int, tuple[str, str]]) -> None:
    hosts = {host for host, _ in where.values()}
    assert len(hosts) == 2 and hosts <= set(cluster.hosts), (where, cluster.hosts)


def _done(output: str) -> dict[str, tuple[int, str]]:
    """Process name -> (task, the rest of its `done:` line)."""
    return {
        match[2]: (int(match[1]), match[3])
        for line in output.splitlines()
        if (match := DONE_LINE.match(line))
    }


def _listening(output: str) -> dict[int, str]:
    """Task -> the address its server (or shard) listens on."""
    return {
        int(match[1]): match[3] for line in output.splitlines() if (match := LISTENING.match(line))
    }


def _assert_finished(
    output: str, servers: list[str], bundles: int, tasks: list[int] | None = None
) -> None:
    """Every server process and bundle said done, at the task it should have (`tasks`, in
    the order servers then bundles; default: the servers first); the servers applied
    updates and each bundle had pushes accepted (it learned against them)."""
    done = _done(output)
    expected = [*servers, *(f"bundle {i}" for i in range(1, bundles + 1))]
    missing = [process for process in expected if process not in done]
    assert not missing, f"no `done:` line from {missing}:\n{_tail(output)}"
    for task, process in zip(tasks or range(len(expected)), expected, strict=True):
        assert done[process][0] == task, (process, done[process], _tail(output))
    for process in servers:
        updates = re.match(r"([\d,]+) updates", done[process][1])
        assert updates and int(updates[1].replace(",", "")) > 0, (process, done[process])
    for i in range(1, bundles + 1):
        accepted = re.search(r"\(([\d,]+) accepted", done[f"bundle {i}"][1])
        assert accepted and int(accepted[1].replace(",", "")) > 0, done[f"bundle {i}"]


def test_a_missing_cluster_skips_unless_it_is_required(monkeypatch):
    """Needs no cluster. Catches a GORILA_REQUIRE_CLUSTER that is not honoured (CI green with
    every multi-host test skipped on a machine that should run them) and a skip without its
    reason (-ra shows it)."""
    monkeypatch.delenv(REQUIRE_CLUSTER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no simulated cluster: SLURM is not"):
        _skip_or_fail("SLURM is not installed")
    monkeypatch.setenv(REQUIRE_CLUSTER, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_CLUSTER}=1 but SLURM is not"):
        _skip_or_fail("SLURM is not installed")
    _skip_or_fail(None)  # a cluster: nothing to say


def test_server_on_one_host_bundle_on_the_other(cluster, tmp_path):
    """srun -N 2 -n 3: task 0 (the server) on one host, listening on that host's own address
    (not loopback, which the other host cannot reach), and a bundle on the other host; both
    bundles' pushes accepted, every role done."""
    output = _srun(cluster, tmp_path / "run", ["-N", "2", "-n", "3"])

    where = _placement(output, 3)
    server_host, server_address = where[0]
    _assert_on_two_hosts(cluster, where)
    assert any(where[task][0] != server_host for task in (1, 2)), where
    assert _listening(output).get(0) == server_address, (where, _tail(output))
    _assert_finished(output, ["server"], bundles=2)


def test_two_server_shards_one_per_host(cluster, tmp_path):
    """srun -N 2 -n 4 --ntasks-per-node=2 --distribution=cyclic with --server-shards 2: shard 0
    on one host, shard 1 on the other, each listening on its own host's address; the bundles
    push to both across hosts and every role is done."""
    flags = ["-N", "2", "-n", "4", "--ntasks-per-node=2", "--distribution=cyclic"]
    output = _srun(cluster, tmp_path / "run", flags, "--server-shards", "2")

    where = _placement(output, 4)
    assert where[0][0] != where[1][0], f"both shards on one host: {where}"
    listening = _listening(output)
    for shard in (0, 1):
        assert listening.get(shard) == where[shard][1], (shard, where, listening)
    _assert_finished(output, ["shard 0", "shard 1"], bundles=2)


def test_shards_spread_over_the_nodes_whatever_the_task_layout(cluster, tmp_path):
    """srun -N 2 -n 4 --ntasks-per-node=2 (block: tasks 0-1 on one host, 2-3 on the other)
    with --server-shards 2: the shards are tasks 0 and 2, one per host, each listening on
    its own host's address; process 0 logs where every role landed. Catches "processes
    0..S-1 are the shards", which put both on the first node."""
    flags = ["-N", "2", "-n", "4", "--ntasks-per-node=2"]
    output = _srun(cluster, tmp_path / "run", flags, "--server-shards", "2")

    where = _placement(output, 4)
    assert where[0][0] == where[1][0] != where[2][0] == where[3][0], where
    listening = _listening(output)
    assert listening.get(0) == where[0][1] and listening.get(2) == where[2][1], listening
    roles = (
        f"shard 0 on {where[0][0]} (process 0); shard 1 on {where[2][0]} (process 2); "
        f"bundle 1 on {where[1][0]}; bundle 2 on {where[3][0]}"
    )
    assert f"0: [shard 0] INFO: roles: {roles}" in output, _tail(output)
    _assert_finished(output, ["shard 0", "shard 1"], bundles=2, tasks=[0, 2, 1, 3])


CLUSTER_DIR = Path(os.environ.get("GORILA_CLUSTER_DIR", "/tmp/gorila-cluster"))
LOCAL_DIR = Path("/var/lib/gorila-cluster-local")  # each host's own disk (.ci/cluster.sh)


def test_a_sharded_run_without_a_shared_run_directory(cluster, tmp_path, read_run_params):
    """The run directory on each host's own disk (not shared, as on nodes without a shared
    file system), --server-shards 2 one per host: every role finishes and writes only its
    own part where it runs (no shard waits for another's files); collected into one
    directory, the parts are a whole run: the params the two slices joined, the server's
    figures both shards'. Catches a shard that gathers or combines from files only a shared
    directory has, and parts that do not fit together once collected."""
    from gorila_jax.server.server_stats import read_run_stats

    name = f"run-{uuid.uuid4().hex[:8]}"
    flags = ["-N", "2", "-n", "4", "--ntasks-per-node=2"]
    # No shared directory for RUN_DIR/run_secret: the job's environment carries the secret.
    secret = {"GORILA_RUN_SECRET": credentials.new_run_secret()}
    output = _srun(cluster, LOCAL_DIR / name, flags, "--server-shards", "2", env=secret)
    where = _placement(output, 4)
    _assert_finished(output, ["shard 0", "shard 1"], bundles=2, tasks=[0, 2, 1, 3])
    parts = {where[task][0]: CLUSTER_DIR / "local" / where[task][0] / name for task in (0, 2)}
    first, second = (parts[where[0][0]], parts[where[2][0]])
    try:
        # Each host holds its own roles' files and none of the other's.
        assert (first / "shard0" / "params_slice.msgpack").is_file()
        assert (first / "config.yaml").is_file() and (first / "bundle1").is_dir()
        assert not (first / "shard1").exists() and not (first / "bundle2").exists()
        assert (second / "shard1" / "params_slice.msgpack").is_file()
        assert (second / "bundle2").is_dir() and not (second / "shard0").exists()
        collected = tmp_path / "collected"
        for part in (first, second):
            shutil.copytree(part, collected, dirs_exist_ok=True)
        flat, versions, slices = read_run_params(collected)
        assert len(slices) == 2 and min(versions) > 0
        assert flat.size == sum(len(s) for s in slices)
        stats = read_run_stats(collected)
        assert stats is not None and stats["server_shards"] == 2
        assert [s["server_shard"] for s in stats["shards"]] == [0, 1]
    finally:
        for part in (first, second):
            shutil.rmtree(part, ignore_errors=True)


def test_hosts_without_a_shared_secret_stop_in_one_line(cluster):
    """The run directory on each host's own disk and no GORILA_RUN_SECRET: each host's
    tasks write a secret of their own, so the rendezvous values of the other host's are
    not signed with theirs. Every task stops (exit 2) with one line naming the variable
    to set, before anything trains. Catches a rendezvous that trusts unsigned values (it
    would train, or hang on credentials the server refuses)."""
    name = f"run-{uuid.uuid4().hex[:8]}"
    flags = ["-N", "2", "-n", "3", "--ntasks-per-node=2"]
    try:
        output = _srun(
            cluster, LOCAL_DIR / name, flags, env={"GORILA_RUN_SECRET": ""}, expect_status=2
        )
    finally:
        for host in ("h1", "h2"):
            shutil.rmtree(CLUSTER_DIR / "local" / host / name, ignore_errors=True)
    refusals = [line for line in output.splitlines() if "not signed with this run's key" in line]
    assert refusals and all("GORILA_RUN_SECRET" in line for line in refusals), _tail(output)
    assert "frames" not in output, _tail(output)


SHARD_CUT_SECONDS = 12.0  # a shard's host, the first time (shorter than 5 s + the 20 s retry)
BUNDLE_CUT_SECONDS = 45.0  # a bundle's host: longer than the bundles' 30 s server timeout
SERVER_CUT_SECONDS = 25.0  # the single server's host, with a 10 s server timeout


def _server_stats(run_dir: Path, shard: int | None = None) -> dict | None:
    """The server's ps.json (shard `shard`'s own, in a sharded run); None until written."""
    path = run_dir / ("ps.json" if shard is None else f"shard{shard}/ps.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _version(run_dir: Path, shard: int | None = None) -> int:
    """The server's (or shard's) version from its ps.json; 0 until it has written one."""
    stats = _server_stats(run_dir, shard) or {}
    return int(stats.get("version") or 0)


def _accepted(run_dir: Path, worker: int) -> int:
    """How many of worker `worker`'s pushes the single server accepted (its ps.json)."""
    workers = (_server_stats(run_dir) or {}).get("workers") or {}
    return int((workers.get(str(worker)) or {}).get("accepted") or 0)


def _rate(run_dir: Path, shard: int | None, seconds: float) -> float:
    """Updates per second the server (or shard `shard`) applied over the next `seconds`."""
    first = _version(run_dir, shard)
    time.sleep(seconds)
    return (_version(run_dir, shard) - first) / seconds


@contextlib.contextmanager
def _srun_placed(cluster: Cluster, tmp_path: Path, hosts: list[str], *extra: str, srun_flags=()):
    """`srun -l` of the CartPole script in the background, task i on `hosts[i]`
    (SLURM_HOSTFILE with --distribution=arbitrary), with `srun_flags` of srun's own;
    yields (process, run dir). Whatever is left when the block ends is cancelled and
    killed."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{host}\n" for host in hosts))
    run_dir = tmp_path / "run"
    job_name = _job_name("placed")
    command = cluster.command(
        "srun", "-l", f"--job-name={job_name}", "-n", str(len(hosts)),
        "--distribution=arbitrary", *srun_flags,
        *_cartpole(run_dir, "--stats-every-seconds", "1", *extra),
    )  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLURM_HOSTFILE": str(hostfile)}
    with open(tmp_path / "srun.out", "w") as output:  # read with _output (no pipe to fill)
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    process.output_path = tmp_path / "srun.out"
    try:
        yield process, run_dir
    finally:
        if process.poll() is None:
            cluster.cancel(job_name)
            process.kill()
            process.wait(timeout=60)


def _output(process: subprocess.Popen) -> str:
    """What a `_srun_placed` run has printed so far."""
    return process.output_path.read_text(errors="replace")


def _finish(process: subprocess.Popen) -> str:
    """Wait for a `_srun_placed` run to end; its whole output."""
    try:
        process.wait(timeout=STEP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run went on past {STEP_TIMEOUT_SECONDS}s:\n{_tail(_output(process))}")
    return _output(process)


@contextlib.contextmanager
def _link_cut(host: str):
    """`host`'s link to the bridge down for the block, and up again whatever happens."""
    subprocess.run(["ip", "-n", "gorila-br", "link", "set", host, "down"], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", "gorila-br", "link", "set", host, "up"], check=True)


def _wait_until(condition, process: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        shown = _tail(_output(process)) if hasattr(process, "output_path") else ""
        assert process.poll() is None, f"the run ended before {what}:\n{shown}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f}s:\n{shown}"
        time.sleep(0.5)


def test_a_cut_shard_host_stalls_only_its_own_slice_and_one_lost_for_good_ends_the_step(
    cluster, tmp_path
):
    """Shard 1 alone on the second host (tasks 0-2 on the first, task 3 on the second),
    --server-shards 2, the bundles' server timeout 5 s and retry window 20 s.

    First the second host's link is cut for 12 s: shard 0 goes on applying pushes at least
    a quarter as fast as before (not half: the tests beside this one can take half its CPU
    between the two windows; a shard 0 that froze with shard 1 falls to almost 0), no
    bundle takes shard 0 for lost, and once the link is back the bundles reconnect to
    shard 1 and it applies pushes again. Catches pushes that wait for every shard's ack in
    turn (shard 0 then froze with shard 1) and a reply's deadline checked before the
    socket was read (a healthy shard declared lost).

    Then the link goes down and stays down: the bundles give up on shard 1 after their
    retry window with one line naming the shard, its task and its host, and
    `srun --kill-on-bad-exit=1` (as the sbatch example runs) ends the step with an error
    instead of leaving the other tasks waiting; the step's exit is not 0 once srun can
    reach the host again to take its task down."""
    first, second = cluster.hosts[:2]
    placed = [first, first, first, second]
    extra = (
        "--server-shards", "2", "--total-frames", "10000000", "--server-timeout-seconds",
        "5", "--server-retry-seconds", "20",
    )  # fmt: skip
    with _srun_placed(cluster, tmp_path, placed, *extra, srun_flags=("--kill-on-bad-exit=1",)) as (
        process,
        run_dir,
    ):
        _wait_until(lambda: _version(run_dir, 0) >= 500, process, 120, "learning")
        before = _rate(run_dir, 0, 6.0)
        with _link_cut(second):
            time.sleep(3.0)  # shard 1 is stalled after 2 s without an ack
            during = _rate(run_dir, 0, SHARD_CUT_SECONDS - 3.0)
            cut_at = _version(run_dir, 1)
        _wait_until(lambda: _version(run_dir, 1) > cut_at + 50, process, 60, "shard 1 back")
        print(f"shard 0: {before:.0f} updates/s before the cut, {during:.0f}/s during it")
        assert during >= 0.25 * before > 0, (before, during, _tail(_output(process)))
        named = f"server shard 1 (task 3 on {second}) did not come back within 20s"
        with _link_cut(second):
            _wait_until(lambda: named in _output(process), process, 90, "the bundles' line")
            time.sleep(2.0)  # srun has begun to take the step down
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the step did not end:\n{_tail(_output(process))}")
        output = _output(process)
    assert process.returncode != 0, _tail(output)
    lines = output.splitlines()
    assert any("reconnected to server shard 1" in line for line in lines), _tail(output)
    assert not any("lost server shard 0" in line for line in lines), _tail(output)
    assert not any("reconnected to server shard 0" in line for line in lines), _tail(output)
    where = _placement(output, 4)
    assert where[3][0] == second and {where[t][0] for t in (0, 1, 2)} == {first}, where
    named_lines = [line for line in lines if named in line]
    assert any("[bundle" in line or "error: bundle lost the server" in line for line in named_lines)
    assert not any("Traceback" in line for line in lines), _tail(output)


def test_a_cut_bundle_host_leaves_the_rest_going_and_its_bundle_comes_back(cluster, tmp_path):
    """The server and bundle 1 on one host, bundle 2 alone on the other, whose link is cut
    for 45 s (past the 30 s server timeout): the server goes on applying bundle 1's pushes
    during the cut, only bundle 2 loses the server, and it comes back by itself once the
    link is up (its pushes are accepted again); the run finishes with every role done."""
    first, second = cluster.hosts[:2]
    with _srun_placed(cluster, tmp_path, [first, first, second], "--total-frames", "26000") as (
        process,
        run_dir,
    ):
        _wait_until(lambda: _accepted(run_dir, 1) >= 100, process, 120, "pushes from bundle 2")
        before = _rate(run_dir, None, 5.0)
        with _link_cut(second):
            during = _rate(run_dir, None, 15.0)
            time.sleep(BUNDLE_CUT_SECONDS - 15.0)
            cut_off_at = _accepted(run_dir, 1)
        _wait_until(lambda: _accepted(run_dir, 1) > cut_off_at, process, 60, "pushes after")
        output = _finish(process)
    assert process.returncode == 0, _tail(output)
    print(f"server: {before:.0f} updates/s before the cut, {during:.0f}/s during it")
    assert during >= 0.25 * before > 0, (before, during, _tail(output))
    lines = output.splitlines()
    assert any("[bundle 2] WARNING: lost the server" in line for line in lines), _tail(output)
    assert any("[bundle 2] INFO: reconnected to the server" in line for line in lines)
    assert not any("[bundle 1]" in line and "lost the server" in line for line in lines)
    _assert_finished(output, ["server"], bundles=2)


def test_a_cut_server_host_makes_bundles_back_off_and_resume(cluster, tmp_path):
    """A single server alone on a host whose link is cut for 25 s, bundles on the other
    with a 10 s server timeout: both lose the server, back off, and resume once the link
    is up, against the same server (its version goes on from where it was: nothing is
    lost, nothing restarted); the run finishes with every role done. (The server is task
    0, on the step's first node, where jax.distributed's coordinator must be.)"""
    first, second = cluster.hosts[:2]
    extra = ("--total-frames", "30000", "--server-timeout-seconds", "10")
    with _srun_placed(cluster, tmp_path, [first, second, second], *extra) as (process, run_dir):
        _wait_until(lambda: _version(run_dir) >= 300, process, 120, "learning")
        with _link_cut(first):
            time.sleep(SERVER_CUT_SECONDS)
        at_the_cut = _version(run_dir)
        _wait_until(lambda: _version(run_dir) > at_the_cut + 100, process, 90, "updates after")
        output = _finish(process)
    assert process.returncode == 0, _tail(output)
    lines = output.splitlines()
    for bundle in (1, 2):
        assert any(f"[bundle {bundle}] WARNING: lost the server" in line for line in lines)
        assert any(f"[bundle {bundle}] INFO: reconnected to the server" in line for line in lines)
    assert not any("ERROR" in line for line in lines), _tail(output)
    done = _done(output)
    updates = int(re.match(r"([\d,]+) updates", done["server"][1])[1].replace(",", ""))
    assert updates > at_the_cut, (updates, at_the_cut)
    _assert_finished(output, ["server"], bundles=2)


def test_a_bundle_joins_the_running_job_from_the_other_host(cluster, tmp_path):
    """A job of server + 1 bundle on the first host with room for 2 (--max-bundles 2); a
    second srun on the other host runs `cartpole.py --join RUN_DIR` and becomes bundle 2,
    reaching the server at the first host's address: the server's per-bundle counts show
    both bundles' pushes accepted. SIGTERM (scancel) takes the joined bundle out, the job
    goes on, and it finishes with its own bundle done."""
    first, second = cluster.hosts[:2]
    extra = ("--max-bundles", "2", "--total-frames", "20000")
    with _srun_placed(cluster, tmp_path, [first, first], *extra) as (process, run_dir):
        _wait_until(lambda: (run_dir / "join.json").exists(), process, 120, "join file")
        job_name = _job_name("join")
        joiner = subprocess.Popen(
            cluster.command(
                "srun", "-l", f"--job-name={job_name}", "-w", second, "-n", "1",
                "sh", "-c", WHERE, sys.executable, "experiments/cartpole.py",
                "--join", str(run_dir),
            ),
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            _wait_until(lambda: _accepted(run_dir, 1) >= 20, joiner, 180, "joined pushes")
            stats = _server_stats(run_dir)
            assert stats["joined"] == [1] and stats["workers"]["0"]["accepted"] > 0, stats
            cluster.cancel(job_name)  # SIGTERM to the joined bundle
            joined_output, _ = joiner.communicate(timeout=90)
        finally:
            if joiner.poll() is None:
                cluster.cancel(job_name)
                joiner.kill()
                joiner.communicate(timeout=60)
        assert f"gorila-test: task 0 on {second}" in joined_output, _tail(joined_output)
        assert "[bundle 2] INFO: joined the job" in joined_output, _tail(joined_output)
        assert process.poll() is None, "the job ended with its joined bundle"
        output = _finish(process)
    assert process.returncode == 0, _tail(output)
    stats = _server_stats(run_dir)
    assert stats["workers"]["1"]["accepted"] >= 20 and 1 in stats["stopped_workers"], stats
    _assert_finished(output, ["server"], bundles=1)


def test_sbatch_job_on_two_nodes(cluster, tmp_path):
    """sbatch --nodes 2 --wait of a job script that sruns the CartPole script: the job spans
    both hosts (the server on one, a bundle on the other), exits 0, every role is done."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.out"
    script = tmp_path / "cartpole.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=3\n"
        "set -euo pipefail\n"
        'echo "gorila-test: batch script on $(hostname), job nodes $SLURM_JOB_NODELIST"\n'
        "export PYTHONUNBUFFERED=1\n"
        f"srun -l {shlex.join(_cartpole(run_dir))}\n"
    )
    job_name = _job_name("sbatch")
    command = cluster.command(
        "sbatch", "--wait", "--nodes", "2", f"--job-name={job_name}", f"--output={log_path}",
        f"--chdir={ROOT}", str(script),
    )  # fmt: skip
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BATCH_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        cluster.cancel(job_name)
        job_log = log_path.read_text() if log_path.exists() else "(no job output yet)"
        pytest.fail(
            f"sbatch --wait ran past {BATCH_TIMEOUT_SECONDS}s; job output:\n{_tail(job_log)}"
        )
    job_log = log_path.read_text() if log_path.exists() else "(no job output)"
    assert result.returncode == 0, (
        f"sbatch exited {result.returncode}: {result.stderr.strip()}\njob output:\n{_tail(job_log)}"
    )

    where = _placement(job_log, 3)
    _assert_on_two_hosts(cluster, where)
    assert any(where[task][0] != where[0][0] for task in (1, 2)), where
    _assert_finished(job_log, ["server"], bundles=2)
