"""Bundles that join a running job (`--max-bundles`, `--join`): the server's side of a join
(which worker index it hands out, when it is full, when the run is over), the join file
and the settings a joining bundle plays with. The runs themselves are in
tests/test_launcher.py (local) and tests/test_multihost.py (across hosts)."""

import dataclasses
import json
import os

import msgpack
import numpy as np
import pytest

from gorila_jax.bundle.client import ServerError
from gorila_jax.bundle.process import joining_config, why_not_joined
from gorila_jax.core.config import ConfigError, cartpole_defaults, parse_cli, to_dict, validate
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority
from gorila_jax.wire.join_file import (
    JoinError,
    JoinInfo,
    read_join_file,
    remove_join_file,
    write_join_file,
)

SECRET = credentials.new_run_secret()
PARAMS = {"w": np.arange(6, dtype=np.float32)}


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_server(launched=1, capacity=3, shard=0, retry=60.0, clock=None) -> ParameterServer:
    config = dataclasses.replace(
        cartpole_defaults(), optimizer="sgd", outlier_k=0.0, max_grad_norm=0.0,
        server_retry_seconds=retry, total_frames=9_000, max_bundles=capacity,
        server_shards=1 if shard == 0 else 2,
    )  # fmt: skip
    return ParameterServer(
        config,
        PARAMS,
        num_workers=capacity,
        authority=WorkerAuthority(capacity, secret=SECRET),
        launched=launched,
        shard=shard,
        clock=clock or Clock(),
    )


class Sender:
    """Requests as a bundle (or a joining one) would send them, straight to `handle`."""

    def __init__(self, server: ParameterServer):
        self.server, self.seq = server, 0

    def send(self, kind: str, *, worker=0, credential=None, arrays=(), **fields) -> dict:
        self.seq += 1
        if credential is None:
            credential = (
                credentials.join_credential(SECRET)
                if kind == "join"
                else credentials.worker_credential(SECRET, worker)
            )
        header = transport.make_header(
            kind, credential=credential, worker=worker, seq=self.seq, version=-1,
            fingerprint=self.server.fingerprint, **fields,
        )  # fmt: skip
        reply = self.server.handle(transport.encode(header, arrays))
        return msgpack.unpackb(bytes(reply[0]))

    def join(self) -> dict:
        return self.send("join")


def test_joins_get_the_lowest_free_index_past_the_started_bundles_until_full():
    server = make_server(launched=1, capacity=3)
    sender = Sender(server)
    first, second, third = sender.join(), sender.join(), sender.join()
    assert (first["kind"], first["assigned"], first["launched"]) == ("joined", 1, 1)
    assert first["frame_budget"] == 9_000  # a started bundle's share: total / launched
    assert second["assigned"] == 2
    assert (third["kind"], third["reason"]) == ("error", "full")
    assert "all 3 bundles" in third["message"]
    # A joined bundle that stops frees its index for the next join.
    assert sender.send("hello", worker=1)["kind"] == "welcome"
    assert sender.send("stop", worker=1)["accepted"]
    assert sender.join()["assigned"] == 1
    stats = server.stats()
    assert stats["launched"] == 1 and stats["joined"] == [1, 2] and stats["num_workers"] == 3
    # The refused join is counted, against nobody's worker.
    assert stats["rejections"] == {"full": 1} and "0" not in stats["workers"]


def test_a_join_needs_the_join_credential_and_a_fresh_seq_and_is_not_worker_0s():
    server = make_server()
    sender = Sender(server)
    worker_0 = credentials.worker_credential(SECRET, 0)
    for credential in (worker_0, credentials.join_credential(credentials.new_run_secret())):
        refused = sender.send("join", credential=credential)
        assert (refused["kind"], refused["reason"]) == ("error", "bad_credential")
    # Worker 0's own requests still number as they did: a join's seq is not its.
    assert sender.join()["kind"] == "joined"
    bundle = Sender(server)
    assert bundle.send("hello", worker=0)["kind"] == "welcome"
    header = transport.make_header(
        "join", credential=credentials.join_credential(SECRET), worker=0, seq=sender.seq,
        version=-1, fingerprint=server.fingerprint,
    )  # fmt: skip
    replayed = msgpack.unpackb(bytes(server.handle(transport.encode(header))[0]))
    assert (replayed["kind"], replayed["reason"]) == ("error", "replayed")
    # The join credential acts for no worker.
    join_credential = credentials.join_credential(SECRET)
    as_worker = Sender(server).send("stop", worker=1, credential=join_credential)
    assert (as_worker["kind"], as_worker["reason"]) == ("error", "bad_credential")
    assert server.stopped_workers == set()


@pytest.mark.parametrize("launched, capacity, shard", [(2, 2, 0), (1, 3, 1)])
def test_a_server_without_room_or_a_shard_past_0_takes_no_join(launched, capacity, shard):
    refused = Sender(make_server(launched, capacity, shard)).join()
    assert (refused["kind"], refused["reason"]) == ("error", "no_join")
    assert ("shard 0" in refused["message"]) == (shard != 0)


def test_the_run_ends_when_the_started_bundles_are_done_and_no_joined_one_is_active():
    clock = Clock()
    server = make_server(launched=1, capacity=3, retry=60.0, clock=clock)
    sender = Sender(server)
    assert sender.join()["assigned"] == 1
    assert sender.send("hello", worker=1)["kind"] == "welcome"
    assert sender.send("stop", worker=0)["accepted"]
    assert not server.all_workers_stopped()  # bundle 2 (worker 1) still plays
    clock.now += 30.0
    assert not server.all_workers_stopped()
    assert sender.send("stop", worker=1)["accepted"]
    assert server.all_workers_stopped()
    # A joined bundle that went silent for longer than a bundle retries is gone: its
    # index is free again and the run does not wait for it.
    assert sender.join()["assigned"] == 1
    assert not server.all_workers_stopped()
    clock.now += 61.0
    assert server.all_workers_stopped() and sender.join()["assigned"] == 1


def invitation(**changes) -> JoinInfo:
    fields = {
        "endpoints": ("tcp://198.18.0.11:5555",),
        "secret": SECRET,
        "fingerprint": "f" * 32,
        "env_id": "CartPole-v1",
        "launched": 1,
        "max_bundles": 2,
        "config": to_dict(cartpole_defaults()),
    }
    return JoinInfo(**(fields | changes))


def test_the_join_file_is_owner_only_and_read_back_whole(tmp_path):
    path = write_join_file(tmp_path, invitation())
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_join_file(tmp_path) == invitation()
    os.chmod(path, 0o644)
    with pytest.raises(JoinError, match="readable by others"):
        read_join_file(tmp_path)
    remove_join_file(tmp_path)
    with pytest.raises(JoinError, match=r"no running job in .* takes bundles"):
        read_join_file(tmp_path)


@pytest.mark.parametrize(
    "document, complaint",
    [
        ("not json", "not a join file"),
        ({"format": 2}, "not a join file of format 1"),
        ({"launched": "1"}, "field 'launched' must be a int"),
        ({"endpoints": ["ipc:///tmp/x"]}, "endpoints must be tcp://"),
        ({"launched": 2, "max_bundles": 2}, "leave no room"),
        ({"secret": "abc"}, "at least 32 hex digits"),
    ],
)
def test_a_broken_join_file_is_refused_in_one_line(tmp_path, document, complaint):
    path = write_join_file(tmp_path, invitation())
    if isinstance(document, dict):
        whole = json.loads(path.read_text()) | document
        path.write_text(json.dumps(whole))
    else:
        path.write_text(document)
    with pytest.raises(JoinError, match=complaint) as refused:
        read_join_file(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_joining_bundle_plays_with_the_jobs_settings_and_refuses_a_conflicting_flag(tmp_path):
    default = cartpole_defaults()
    job = dataclasses.replace(default, learning_rate=3e-4, max_bundles=2)
    offer = invitation(config=to_dict(job))
    own = parse_cli(default, ["--join", str(tmp_path)])
    config = joining_config(own, default, offer, tmp_path)
    assert config.learning_rate == 3e-4 and config.max_bundles == 2
    assert config.run_dir == str(tmp_path) and config.join == str(tmp_path)
    same = parse_cli(default, ["--join", str(tmp_path), "--learning-rate", "3e-4"])
    assert joining_config(same, default, offer, tmp_path).learning_rate == 3e-4
    other = parse_cli(default, ["--join", str(tmp_path), "--learning-rate", "1e-2"])
    with pytest.raises(JoinError, match=r"its learning_rate is 0\.0003, not 0\.01"):
        joining_config(other, default, offer, tmp_path)
    pong = dataclasses.replace(default, env_id="Pong-v5")
    with pytest.raises(JoinError, match="trains CartPole-v1, this program Pong-v5"):
        joining_config(pong, pong, offer, tmp_path)


def test_why_a_join_failed_is_one_line_that_says_what_to_do(tmp_path):
    endpoint = "tcp://198.18.0.11:5555"
    lost = ServerError("no reply to join within 30s", lost=True)
    assert "still running?" in why_not_joined(lost, tmp_path, endpoint)
    full = ServerError("server refused join: full (...)", reason="full", detail="all 3 ...")
    assert why_not_joined(full, tmp_path, endpoint).startswith(f"the job in {tmp_path} is full")
    stale = ServerError("server refused join: bad_credential (...)", reason="bad_credential")
    assert "a stale file?" in why_not_joined(stale, tmp_path, endpoint)


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"max_bundles": -1}, "max_bundles: must be a non-negative integer"),
        ({"max_bundles": 3, "wire_security": "curve"}, "needs --wire-security token"),
        ({"max_bundles": 3, "gradient_part": "default"}, "needs --gradient-part all"),
        ({"join": "x", "single_process": True}, "not to a sync or single-process one"),
    ],
)
def test_settings_that_cannot_take_joining_bundles_are_refused(fields, complaint):
    with pytest.raises(ConfigError, match=complaint):
        validate(dataclasses.replace(cartpole_defaults(), **fields))
