"""Edges of a run a user meets by mistake or on purpose (issue 23, item 13): a forced resume
with another learning rate, a resume that changes the network's shape, and CURVE keys that
do not match. Tiny CartPole runs as a user starts them, every wait bounded in time."""

import dataclasses
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax.bundle.client import ServerConnection, ServerError
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.core.networks import MLP
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "experiments" / "cartpole.py")
pytestmark = pytest.mark.slow


def single_process(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """experiments/cartpole.py --single-process, tiny, in `run_dir`, to its end."""
    return subprocess.run(
        [sys.executable, CARTPOLE, "--single-process", "--run-dir", str(run_dir),
         "--learning-starts", "300", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def flat_saved_params(run_dir: Path) -> np.ndarray:
    saved = flax.serialization.msgpack_restore((run_dir / "params.msgpack").read_bytes())
    return np.asarray(ravel_pytree(saved)[0], np.float64)


def updates_done(stderr: str) -> int:
    """The update count of the run's last log line: `[single process] INFO: done: F frames,
    U updates, ...`."""
    found = re.search(r"^\[single process\] INFO: done: .* ([\d,]+) updates", stderr, re.M)
    return int(found[1].replace(",", ""))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused start (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# ---- resuming with other settings ------------------------------------------------------------


def test_a_forced_resume_with_another_learning_rate_runs_warns_and_uses_it(tmp_path):
    """A tiny run, then the same run dir with the learning rate 1000 times smaller: refused
    in one line naming the change without --force-resume (nothing overwritten); with it, one
    warning line naming the change, the learner resumed at its update count, and the new
    rate in force (the params move by at most ~3.2 learning rates per Adam update: with
    the old rate they would move 1000 times more). Catches a forced resume that is silent,
    refuses anyway, restarts from scratch, or keeps the optimizer of the checkpoint's
    settings (its learning rate) instead of the one asked for."""
    first = single_process(tmp_path, "--total-frames", "1000")
    assert first.returncode == 0, first.stderr[-2000:]
    trained = updates_done(first.stderr)
    before = flat_saved_params(tmp_path)
    config_text = (tmp_path / "config.yaml").read_text()

    refused = single_process(tmp_path, "--total-frames", "2000", "--learning-rate", "1e-6")
    error = one_error_line(refused)
    assert "learning_rate 0.001 -> 1e-06" in error and "--force-resume" in error, error
    assert (tmp_path / "config.yaml").read_text() == config_text

    forced = single_process(
        tmp_path, "--total-frames", "2000", "--learning-rate", "1e-6", "--force-resume"
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    warnings = [line for line in forced.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, forced.stderr[-2000:]
    assert "--force-resume" in warnings[0] and "learning_rate 0.001 -> 1e-06" in warnings[0]
    assert f"resumed its learner at {trained:,} updates" in forced.stderr
    more = updates_done(forced.stderr) - trained
    assert more >= 150, forced.stderr[-1000:]  # (2000 - 1000) frames / 4 per update
    moved = np.abs(flat_saved_params(tmp_path) - before)
    assert 0 < moved.max() <= 3.2 * 1e-6 * more, (moved.max(), more)


def test_a_forced_resume_that_changes_the_networks_shape_is_refused_in_one_line(tmp_path):
    """--force-resume may carry a checkpoint over to other training settings, never into a
    network of another shape: that is one error line (exit 2) before anything is written.
    Catches a shape change found only by a traceback deep in the first forward pass (or,
    worse, not at all), and a run dir whose config.yaml names a network it never ran."""
    first = single_process(tmp_path, "--total-frames", "1000")
    assert first.returncode == 0, first.stderr[-2000:]
    config_text = (tmp_path / "config.yaml").read_text()

    refused = single_process(tmp_path, "--total-frames", "2000", "--mlp-hidden", "64", "64")
    assert "mlp_hidden [128, 128] -> [64, 64]" in one_error_line(refused)

    forced = single_process(
        tmp_path, "--total-frames", "2000", "--mlp-hidden", "64", "64", "--force-resume"
    )
    error = one_error_line(forced)
    assert "--run-dir" in error, error
    assert (tmp_path / "config.yaml").read_text() == config_text


def test_a_decayed_learning_rate_resumes_where_it_was_and_cannot_be_switched_off(tmp_path):
    """A tiny run whose learning rate decays from 1e-3 to 1e-6 over its first 100 updates,
    then resumed with the same command and more frames: the schedule goes on from the
    checkpoint's update count, so the params move by at most ~3.2 end rates per Adam update
    (from a count reset to 0 they would move 1000 times more). Then the decay switched off,
    even with --force-resume: one error line naming it (the optimizer's state would not
    load), the run dir left as it was, nothing called damaged."""
    decay = ("--learning-rate-end", "1e-6", "--learning-rate-decay-start", "0",
             "--learning-rate-decay-updates", "100")  # fmt: skip
    first = single_process(tmp_path, "--total-frames", "1000", *decay)
    assert first.returncode == 0, first.stderr[-2000:]
    trained = updates_done(first.stderr)
    assert trained > 100, trained
    before = flat_saved_params(tmp_path)

    resumed = single_process(tmp_path, "--total-frames", "2000", *decay)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed its learner at {trained:,} updates" in resumed.stderr
    more = updates_done(resumed.stderr) - trained
    assert more >= 150, resumed.stderr[-1000:]
    moved = np.abs(flat_saved_params(tmp_path) - before)
    assert 0 < moved.max() <= 3.2 * 1e-6 * more, (moved.max(), more)

    config_text = (tmp_path / "config.yaml").read_text()
    forced = single_process(
        tmp_path, "--total-frames", "3000", "--learning-rate-decay-updates", "0", "--force-resume"
    )
    error = one_error_line(forced)
    assert "learning-rate decay 'on' -> 'off'" in error and "--run-dir" in error, error
    assert (tmp_path / "config.yaml").read_text() == config_text
    assert not (tmp_path / "damaged_checkpoints").exists()


def test_a_server_forced_onto_another_networks_checkpoint_says_so_not_damaged(tmp_path):
    """Unit level, the server's path of a forced resume after a network change (the launch
    code restores with the tree fingerprint expected): one CheckpointError that names the
    other network, with the checkpoint left as it is. Catches a good checkpoint reported as
    damaged (the user is told to move the run's checkpoints away) and a forced load that
    goes ahead with arrays of the wrong shape."""
    from gorila_jax.io.checkpoint import Checkpointer, CheckpointError

    def server_of(hidden: tuple[int, ...]):
        config = dataclasses.replace(
            cartpole_defaults(), run_dir=str(tmp_path), mlp_hidden=hidden, force_resume=True
        )
        params = MLP(num_actions=2, hidden=hidden).init(jax.random.key(0), np.zeros((1, 4)))
        authority = WorkerAuthority(1, secret=credentials.new_run_secret())
        return config, ParameterServer(config, params, num_workers=1, authority=authority)

    _, trained = server_of((8,))
    checkpointer = Checkpointer(tmp_path, keep=3)
    for _ in range(5):
        trained.apply(0, np.ones(trained.num_params, np.float32))
    trained.save_checkpoint(checkpointer)
    config, other = server_of((4,))
    state, _ = other.checkpoint_state()
    with pytest.raises(CheckpointError) as refused:
        checkpointer.restore_latest(
            state, config=config, expect={"tree_fingerprint": other.fingerprint}, force=True
        )
    message = str(refused.value)
    assert "\n" not in message and "damaged" not in message, message
    assert "network" in message, message
    assert checkpointer.versions() == [5]


# ---- CURVE keys that do not match --------------------------------------------------------------


CURVE_MISMATCH_CAUSES = {
    "server key": "the server's key is not the one this process was given",
    "client key": "the server refused this process's CURVE key",
    "no CURVE": "disagree on wire security",
}


def assert_refused_in_bounded_time(error: ServerError, kind: str, cause: str, elapsed: float):
    """A request over a refused handshake: one line, marked lost, naming `cause`; at once
    when it could not be queued (zmq had dropped the connection), else after the client's
    2 s timeout."""
    message = str(error)
    assert error.lost and cause in message and "\n" not in message, message
    if message.startswith(f"could not send {kind} to "):
        assert elapsed < 1, elapsed
    else:
        assert message.startswith(f"no reply to {kind} within 2s: "), message
        assert 1.5 < elapsed < 10, elapsed


@pytest.mark.parametrize("mismatch", ["none", *CURVE_MISMATCH_CAUSES])
def test_a_bundle_with_curve_keys_that_do_not_match_gets_one_line_in_bounded_time(mismatch):
    """What a bundle sees when its CURVE keys do not match the server's (or it speaks plain
    zmq to a CURVE server): its hello gets no reply (the handshake never completes, so not
    one byte reaches the server), and after its timeout a one-line ServerError, marked lost
    (the bundle then retries until server_retry_seconds, as for a server that is away),
    that names the cause zmq's socket monitor saw. Once zmq has dropped the refused
    connection, a request fails at once instead of waiting to be queued. "none" is the
    control: the right keys get a welcome. Catches a wrong key that hangs the bundle (a
    blocking send on a DEALER with no connection waits forever: this hung CI once),
    reaches the server (a counted hello or unauthenticated sender), or ends in a traceback
    from zmq instead of the bundle's own error. (Whether a request cannot be sent at all
    or goes unanswered depends on where zmq's handshake and reconnection are when it is
    sent: a plain client's second request failed either way in about half the runs here,
    and in CI a refused client key was dropped before even the hello was sent, so both
    are accepted for every request, each bounded.)"""
    context = zmq.Context.instance()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    authenticator = transport.start_curve_authenticator(context, {client_public: 0})
    config = cartpole_defaults()
    params = MLP(num_actions=2, hidden=(8,)).init(jax.random.key(0), np.zeros((1, 4)))
    authority = WorkerAuthority(1, curve_workers={client_public: 0})
    server = ParameterServer(config, params, num_workers=1, authority=authority)
    socket, endpoint = transport.make_server_socket(
        context, "tcp://127.0.0.1:0", server.max_bytes,
        curve=transport.ServerCurve(server_public, server_secret),
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(socket, endpoint, stop.is_set))
    thread.start()
    keys = {
        "none": transport.ClientCurve(client_public, client_secret, server_public),
        "server key": transport.ClientCurve(client_public, client_secret, zmq.curve_keypair()[0]),
        "client key": transport.ClientCurve(*zmq.curve_keypair(), server_public),
        "no CURVE": None,
    }[mismatch]
    connection = ServerConnection(
        endpoint, credential="", worker=0, fingerprint=server.fingerprint,
        num_params=server.num_params, max_bytes=server.max_bytes, timeout_seconds=2.0,
        curve=keys,
    )  # fmt: skip
    try:
        started = time.monotonic()
        if mismatch == "none":
            connection.timeout_seconds = 30.0  # only the refused ones need the 2 s bound
            _, version, _ = connection.hello()
            assert version == 0 and server.stats()["workers"]["0"]["hellos"] == 1
            return
        cause = CURVE_MISMATCH_CAUSES[mismatch]
        with pytest.raises(ServerError) as lost:
            connection.hello()
        assert_refused_in_bounded_time(lost.value, "hello", cause, time.monotonic() - started)
        # A later request fails in bounded time too, naming the cause: at once when zmq has
        # dropped the refused connection (it cannot be queued), or after its timeout when
        # zmq is reconnecting just then (its own retry, whose handshake fails again).
        started = time.monotonic()
        with pytest.raises(ServerError) as unsent:
            connection.receive_pulled(connection.send_pull(-1))
        assert_refused_in_bounded_time(unsent.value, "pull", cause, time.monotonic() - started)
        stats = server.stats()
        assert stats["workers"] == {} and stats["unauthenticated"] == {}, stats
        assert stats["rejections"] == {}, stats
    finally:
        connection.close()
        stop.set()
        thread.join(timeout=10)
        socket.close(linger=0)
        authenticator.stop()
