"""The bundle's connection: several requests in flight, replies matched by sequence number,
no route another peer can take over, a server of another wire protocol named as such; the
welcome the client requires; the remote learner's hand-over of pulled params."""

import dataclasses
import threading
import time

import jax
import msgpack
import numpy as np
import pytest
import zmq
from jax.flatten_util import ravel_pytree
from zmq.utils.monitor import recv_monitor_message

from gorila_jax.bundle import client as client_module
from gorila_jax.bundle.client import Push, ServerConnection, ServerError
from gorila_jax.bundle.remote_learner import RemoteLearner
from gorila_jax.core.config import cartpole_defaults
from gorila_jax.core.networks import MLP
from gorila_jax.core.shard_layout import ShardLayout
from gorila_jax.server.parameter_server import ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

SECRET = credentials.new_run_secret()


def credential(worker: int) -> str:
    return credentials.worker_credential(SECRET, worker)


def push_and_wait(connection: ServerConnection, grads, **fields) -> tuple:
    """(accepted, reason, version) of one push, as the bundle's client sends it."""
    return connection.receive_ack(connection.send_push(grads, **fields))


def pull_and_wait(connection: ServerConnection, have_version: int) -> tuple:
    """(params or None, version) of one pull, as the bundle's client sends it."""
    return connection.receive_pulled(connection.send_pull(have_version))


def _bound_server(tmp_path):
    """A CartPole server (sgd, no clipping) and its bound socket, not serving yet."""
    config = dataclasses.replace(cartpole_defaults(), optimizer="sgd", max_grad_norm=0.0)
    params = MLP(num_actions=2, hidden=(8,)).init(jax.random.key(0), np.zeros((1, 4)))
    server = ParameterServer(
        config, params, num_workers=1, authority=WorkerAuthority(1, secret=SECRET),
        run_dir=tmp_path,
    )  # fmt: skip
    sock, endpoint = transport.make_server_socket(
        zmq.Context.instance(), "tcp://127.0.0.1:0", server.max_bytes
    )
    return server, sock, endpoint


def _connect(server, endpoint: str, timeout_seconds: float) -> ServerConnection:
    return ServerConnection(
        endpoint, credential=credential(0), worker=0, fingerprint=server.fingerprint,
        num_params=server.num_params, max_bytes=server.max_bytes,
        timeout_seconds=timeout_seconds,
    )  # fmt: skip


@pytest.fixture
def served(tmp_path):
    server, sock, endpoint = _bound_server(tmp_path)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock, endpoint, stop.is_set))
    thread.start()
    connection = _connect(server, endpoint, 5.0)
    yield server, connection
    connection.close()
    stop.set()
    thread.join(timeout=10)
    sock.close(linger=0)


def test_pushes_in_flight_and_a_pull_between_them(served):
    server, connection = served
    flat, version, _ = connection.hello()
    grads = [np.full(server.num_params, value, np.float32) for value in (1.0, 2.0)]
    first = connection.send_push(grads[0], base_version=version, mean_abs_td=0.1, frames=4)
    second = connection.send_push(grads[1], base_version=version, mean_abs_td=0.1, frames=8)
    params, pulled_version = pull_and_wait(connection, -1)  # its reply comes after both acks
    assert pulled_version == 2
    assert connection.receive_ack(second) == (True, None, 2)
    assert connection.receive_ack(first) == (True, None, 1)
    learning_rate = server.config.learning_rate
    np.testing.assert_allclose(params, flat - learning_rate * 3.0, rtol=1e-6)


def test_a_reply_that_never_comes_is_lost_and_cancel_stops_waiting(served):
    server, connection = served
    connection.hello()
    server.submit = lambda *args: []  # a server that answers nothing
    seq = connection.send_pull(-1)
    connection.cancel.set()
    with pytest.raises(ServerError, match="cancelled"):
        connection.receive_reply(seq)
    connection.cancel.clear()
    connection.timeout_seconds = 0.5
    with pytest.raises(ServerError, match="no reply") as lost:
        connection.request("pull")
    assert lost.value.lost


def impostor(context: zmq.Context, endpoint: str, identity: bytes) -> zmq.Socket:
    """A DEALER with routing id `identity`, returned once its handshake with the server is
    done (it sends nothing)."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.LINGER, 0)
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        socket.connect(endpoint)
        assert monitor.poll(5000), "no handshake"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)
    return socket


def test_a_peer_claiming_a_bundles_identity_gets_nothing_meant_for_it(tmp_path):
    config = dataclasses.replace(cartpole_defaults(), optimizer="sgd", max_grad_norm=0.0)
    params = MLP(num_actions=2, hidden=(8,)).init(jax.random.key(0), np.zeros((1, 4)))
    server = ParameterServer(
        config, params, num_workers=2, authority=WorkerAuthority(2, secret=SECRET),
        run_dir=tmp_path,
    )  # fmt: skip
    context = zmq.Context.instance()
    sock, endpoint = transport.make_server_socket(context, "tcp://127.0.0.1:0", server.max_bytes)
    connection = ServerConnection(
        endpoint, credential=credential(0), worker=0, fingerprint=server.fingerprint,
        num_params=server.num_params, max_bytes=server.max_bytes, timeout_seconds=5.0,
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock, endpoint, stop.is_set))
    impostors = []
    try:
        # The hello waits at the server while peers claiming bundle identities connect.
        hello = connection.send_request("hello")
        for identity in (b"bundle-0", b"bundle-1", b"worker-0", b"0"):
            impostors.append(impostor(context, endpoint, identity))
        thread.start()
        welcome = connection.receive_reply(hello)
        assert welcome.header["kind"] == "welcome"
        np.testing.assert_array_equal(welcome.arrays[0], ravel_pytree(params)[0])
        grads = np.ones(server.num_params, np.float32)
        assert push_and_wait(connection, grads, base_version=0, mean_abs_td=1.0, frames=4)[0]
        assert pull_and_wait(connection, 0)[1] == 1
        received = []
        for peer in impostors:
            assert not peer.poll(300), "a reply meant for the bundle reached another peer"
            # What an impostor gets for a request of its own: an error, with no credential.
            header = transport.make_header(
                "pull", credential="x" * 64, worker=0, seq=1, version=-1,
                fingerprint=server.fingerprint,
            )  # fmt: skip
            peer.send_multipart(transport.encode(header))
            assert peer.poll(5000)
            received.append(peer.recv_multipart())
        for frames in received:
            assert len(frames) == 1
            assert SECRET.encode() not in frames[0] and credential(0).encode() not in frames[0]
            reply = msgpack.unpackb(frames[0])
            assert (reply["kind"], reply["reason"]) == ("error", "bad_credential")
        assert server.stats()["workers"]["0"]["accepted"] == 1
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        for peer in impostors:
            peer.close(linger=0)
        connection.close()
        sock.close(linger=0)


class FakeConnection:
    """A ServerConnection for RemoteLearner without a server: `pull` hands out the queued
    params, pushes are acknowledged, and every call is recorded with its thread's name.
    `hold` (when set) keeps `send_push` waiting, like a socket call that does not return."""

    worker = 0

    def __init__(self, num_params: int):
        self.num_params = num_params
        self.timeout_seconds = 5.0
        self.cancel = threading.Event()
        self.calls: list[tuple[str, str]] = []
        self.pulls: list[tuple[np.ndarray, int]] = []
        self.hold: threading.Event | None = None
        self.seq = 0

    def _record(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    def hello(self):
        self._record("hello")
        info = {
            "num_params": self.num_params, "server_shard": 0,
            "shard_layout": [0, self.num_params], "num_workers": 1,
            "part_size": self.num_params, "frames": 0,
        }  # fmt: skip
        return np.zeros(self.num_params, np.float32), 0, info

    def send_pull(self, have_version: int) -> int:
        self._record("send_pull")
        self.seq += 1
        return self.seq

    def receive_pulled(self, seq: int, **_):
        self._record("receive_pulled")
        return self.pulls.pop(0)

    def send_push(self, grads, **fields) -> int:
        self._record("send_push")
        if self.hold is not None:
            self.hold.wait(30)
        self.seq += 1
        return self.seq

    def receive_ack(self, seq: int, **_):
        self._record("receive_ack")
        return True, None, seq

    def stop(self) -> None:
        self._record("stop")

    def close(self) -> None:
        self._record("close")


def remote_learner(connection: FakeConnection, **overrides) -> tuple[RemoteLearner, dict]:
    config = dataclasses.replace(cartpole_defaults(), **overrides)
    network = MLP(num_actions=2, hidden=(8,))
    params = network.init(jax.random.key(0), np.zeros((1, 4), np.float32))
    return RemoteLearner(config, network, params, [connection], num_workers=1), params


def flat_params(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def test_a_target_refresh_is_not_lost_to_a_later_pull():
    connection = FakeConnection(num_params=58)
    learner, _ = remote_learner(connection)
    try:
        refreshed, newer = np.full(58, 1.0, np.float32), np.full(58, 2.0, np.float32)
        client = learner.client
        # What the communication thread hands over: a target refresh (target_period
        # 250), then a plain pull, both before the main thread looks.
        client._shards[0].held_version, client._host = 250, refreshed
        client._deliver(refresh_target=True)
        client._shards[0].held_version, client._host = 251, newer
        client._deliver(refresh_target=False)
        learner.acting_params()
        np.testing.assert_array_equal(flat_params(learner.params), newer)
        np.testing.assert_array_equal(flat_params(learner.target_params), refreshed)
        assert learner.params_version == 251
    finally:
        learner.close(quick=True)


def test_only_the_communication_thread_touches_the_connection_after_it_starts():
    connection = FakeConnection(num_params=58)
    learner, _ = remote_learner(connection)
    learner.client.push(Push(np.zeros(58, np.float32), mean_abs_td=0.5, versions=(0,), frames=0))
    learner.close()
    assert [name for name, _ in connection.calls][-2:] == ["stop", "close"]
    assert {thread for name, thread in connection.calls if name != "hello"} == {"ps-client"}


def test_close_leaves_the_socket_to_a_communication_thread_that_does_not_finish():
    connection = FakeConnection(num_params=58)
    learner, _ = remote_learner(connection)
    connection.hold = threading.Event()
    learner.client.push(Push(np.zeros(58, np.float32), 0.5, (0,), 0))
    deadline = time.monotonic() + 10
    while ("send_push", "ps-client") not in connection.calls:  # stuck inside the socket call
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    learner.close(quick=True)
    assert time.monotonic() - started < 10
    assert {thread for name, thread in connection.calls if name != "hello"} == {"ps-client"}
    assert "close" not in [name for name, _ in connection.calls]  # not from this thread
    connection.hold.set()  # the thread finishes its call, then says goodbye itself
    learner.client._thread.join(timeout=10)
    assert [name for name, _ in connection.calls][-2:] == ["stop", "close"]
    assert {thread for name, thread in connection.calls if name != "hello"} == {"ps-client"}


MISSING = object()  # a welcome field a stand-in server leaves out


class ShardConnection:
    """One server shard as RemoteLearner sees it, without a server: acks every push (the
    first one lost when `lose_first_ack`), answers a hello sent again on the third look
    (never when `never_back`). `welcome` changes what its welcome says (a value of
    `MISSING`: the field left out)."""

    worker = 0

    def __init__(self, shard: int, layout, *, lose_first_ack=False, never_back=False):
        self.shard, self.layout = shard, layout
        self.num_params = layout.size(shard)
        self.timeout_seconds = 5.0
        self.cancel = threading.Event()
        self.calls: list[str] = []
        self.pushed: list[int] = []
        self.seq = self.version = self.looks = 0
        self.lose, self.never_back = lose_first_ack, never_back
        self.fresh: float | None = None
        self.welcome: dict = {}

    def _info(self) -> dict:
        bounds = list(self.layout.bounds)
        info = {"num_params": self.num_params, "server_shard": self.shard,
                "shard_layout": bounds, "num_workers": 1, "part_size": self.num_params,
                "frames": 0} | self.welcome  # fmt: skip
        return {name: value for name, value in info.items() if value is not MISSING}

    def _next(self, call: str) -> int:
        self.calls.append(call)
        self.seq += 1
        return self.seq

    def hello(self):
        self.calls.append("hello")
        return np.zeros(self.num_params, np.float32), self.version, self._info()

    def send_push(self, grads, **fields) -> int:
        self.pushed.append(len(grads))
        return self._next("send_push")

    def receive_ack(self, seq: int, **_):
        if self.lose:
            self.lose = False
            raise ServerError("no reply to push within 3s", lost=True)
        self.version += 1
        return True, None, self.version

    def send_pull(self, have_version: int) -> int:
        return self._next("send_pull")

    def receive_pulled(self, seq: int, **_):
        if self.fresh is not None:  # newer params: the slice filled with `fresh`
            return np.full(self.num_params, self.fresh, np.float32), self.version
        return None, self.version

    def reconnect(self) -> None:
        self.calls.append("reconnect")

    def send_request(self, kind: str, arrays=(), **fields) -> int:
        return self._next(f"send_{kind}")

    def receive_reply(self, seq: int, *, interruptible=True, wait=True):
        self.looks += 1
        if self.never_back:
            raise ServerError("no reply to hello within 5s", lost=True)
        if self.looks < 3:
            return None  # not yet: the learner goes on with the other shard
        header = {"kind": "welcome", "seq": seq, "version": self.version, "config": self._info()}
        return transport.Message(header, [np.full(self.num_params, 7.0, np.float32)])

    def stop(self) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")


def sharded_learner(*connections, **overrides) -> RemoteLearner:
    overrides = {"server_shards": 2, **overrides}
    config = dataclasses.replace(cartpole_defaults(), **overrides)
    network = MLP(num_actions=2, hidden=(8,))
    params = network.init(jax.random.key(0), np.zeros((1, 4), np.float32))
    return RemoteLearner(config, network, params, list(connections), num_workers=1)


def test_a_lost_shard_is_said_hello_again_while_the_other_gets_every_push():
    layout = ShardLayout.even(58, 2)
    kept, lost = ShardConnection(0, layout), ShardConnection(1, layout, lose_first_ack=True)
    learner = sharded_learner(kept, lost)
    for _ in range(6):
        learner.client.push(Push(np.ones(58, np.float32), 0.5, (0, 0), 0))
    learner.close()  # a normal close waits for the lost shard, then stops both
    assert learner.client.error is None and learner.reconnects == 1
    assert kept.pushed == [29] * 6  # every push reached the shard that stayed
    assert lost.calls.count("reconnect") == 1 and "send_hello" in lost.calls
    assert kept.calls[-2:] == ["stop", "close"] and lost.calls[-2:] == ["stop", "close"]
    # The slice the shard sent back with its welcome replaced the bundle's copy of it.
    flat = flat_params(learner.acting_params())
    np.testing.assert_array_equal(flat[29:], 7.0)
    np.testing.assert_array_equal(flat[:29], 0.0)


def test_a_shard_that_never_comes_back_ends_the_bundle_with_its_name():
    layout = ShardLayout.even(58, 2)
    kept = ShardConnection(0, layout)
    lost = ShardConnection(1, layout, lose_first_ack=True, never_back=True)
    learner = sharded_learner(kept, lost, server_retry_seconds=1.0)
    learner.client.push(Push(np.ones(58, np.float32), 0.5, (0, 0), 0))
    started = time.monotonic()
    with pytest.raises(ServerError, match="server shard 1 did not come back within 1s"):
        learner.close()
    assert time.monotonic() - started < 10
    assert "stop" not in lost.calls and lost.calls[-1] == "close"


def _late_server(tmp_path, start_after: float | None):
    """A bound server socket whose server starts answering only after `start_after`
    seconds (never when None), like a shard still compiling its update programs."""
    server, sock, endpoint = _bound_server(tmp_path)
    stop = threading.Event()

    def serve_late():
        if start_after is not None and not stop.wait(start_after):
            server.serve(sock, endpoint, stop.is_set)

    thread = threading.Thread(target=serve_late)
    thread.start()
    connection = _connect(server, endpoint, 0.5)

    def shut():
        connection.close()
        stop.set()
        thread.join(timeout=10)
        sock.close(linger=0)

    return server, connection, shut


def test_a_server_slower_to_start_than_the_timeout_is_waited_for_up_to_the_retry_window(
    tmp_path, caplog
):
    """The first hello goes unanswered for longer than the reply timeout (a shard that has
    bound its socket but is still compiling, on a loaded host): the client says hello
    again within its retry window instead of ending the bundle."""
    started = time.monotonic()  # before the server's clock starts: it answers 1.6 s on
    server, connection, shut = _late_server(tmp_path, start_after=1.6)
    layout = ShardLayout.even(server.num_params, 1)
    try:
        with caplog.at_level("WARNING", logger=client_module.__name__):
            client = client_module.ShardedClient(
                [connection], layout=layout, pieces=[layout.slice(0)], target_period=100,
                retry_seconds=20.0,
            )  # fmt: skip
        assert 1.5 < time.monotonic() - started < 10
        assert client.initial.versions == (0,)
        assert "the server has not answered hello yet" in caplog.text
        assert server.stats()["workers"]["0"]["hellos"] >= 1
        client.close(timeout_seconds=10)
    finally:
        shut()


def test_a_server_that_never_answers_hello_ends_the_bundle_after_the_retry_window(tmp_path):
    server, connection, shut = _late_server(tmp_path, start_after=None)
    layout = ShardLayout.even(server.num_params, 1)
    try:
        started = time.monotonic()
        never = r"the server did not answer hello within 2s \(no reply"
        with pytest.raises(ServerError, match=never):
            client_module.ShardedClient(
                [connection], layout=layout, pieces=[layout.slice(0)], target_period=100,
                retry_seconds=2.0,
            )  # fmt: skip
        assert 1.9 < time.monotonic() - started < 8  # the 2 s window, not much more
    finally:
        shut()


def test_a_reply_can_be_looked_for_without_waiting(served):
    server, connection = served
    seq = connection.send_request("hello")
    reply = None
    deadline = time.monotonic() + 10
    while reply is None:
        assert time.monotonic() < deadline
        reply = connection.receive_reply(seq, wait=False)  # None until it has come
        time.sleep(0.001)
    assert reply.header["kind"] == "welcome" and reply.header["seq"] == seq
    assert len(reply.arrays[0]) == server.num_params
    with pytest.raises(KeyError):  # answered: no longer pending
        connection.receive_reply(seq, wait=False)


def test_a_reply_of_the_wrong_kind_is_one_error_not_a_key_error(served):
    server, connection = served
    connection.hello()
    # A server (or a stand-in) answering a stop with "not_modified".
    server._handlers["stop"] = lambda header, arrays: server._reply(header, "not_modified")
    with pytest.raises(ServerError, match="bad reply to stop: a 'not_modified' reply"):
        connection.stop()


# ---- a server of another wire protocol -----------------------------------------------------


@pytest.fixture
def stand_in():
    """A bare ROUTER standing in for a server (it answers what a test makes it answer), and
    a connection to it."""
    router, endpoint = transport.make_server_socket(
        zmq.Context.instance(), "tcp://127.0.0.1:0", 1 << 20
    )
    connection = ServerConnection(
        endpoint, credential=credential(0), worker=0, fingerprint="f" * 32, num_params=8,
        max_bytes=1 << 20, timeout_seconds=5.0,
    )  # fmt: skip
    yield router, connection
    connection.close()
    router.close(linger=0)


def answer(router: zmq.Socket, reply_for) -> dict:
    """Take one request at the stand-in and send back the frames `reply_for(its header)`
    makes; returns the request's header."""
    assert router.poll(5000), "no request came"
    routing_id, frames = transport.recv(router)
    request = msgpack.unpackb(frames[0].buffer)
    router.send_multipart([routing_id, *reply_for(request)])
    return request


def protocol_2_reply(kind: str, **fields):
    """What a server of protocol 2 answered: a reply header saying protocol 2 (a welcome
    with its shard and shard_size), a vector with a welcome or params."""
    vector = kind in ("welcome", "params")

    def reply_for(request: dict) -> list[bytes]:
        header = {
            "kind": kind, "protocol": 2, "worker": request["worker"], "seq": request["seq"],
            "version": 0, "fingerprint": "f" * 32, "arrays": int(vector), **fields,
        }  # fmt: skip
        return [msgpack.packb(header), *([np.zeros(8, np.float32).tobytes()] if vector else [])]

    return reply_for


OLD_WELCOME = {"num_params": 8, "server_shard": 0, "shard_layout": [0, 8], "num_workers": 1,
               "shard": None, "shard_size": 8, "frames": 0}  # fmt: skip
SENDS = {
    "hello": lambda c: c.send_request("hello"),
    "pull": lambda c: c.send_pull(-1),
    "push": lambda c: c.send_push(
        np.zeros(8, np.float32), base_version=0, mean_abs_td=1.0, frames=0
    ),
    "stop": lambda c: c.send_request("stop"),
}
RECEIVES = {
    "hello": lambda c, seq: c.receive_reply(seq),
    "pull": lambda c, seq: c.receive_pulled(seq),
    "push": lambda c, seq: c.receive_ack(seq),
    "stop": lambda c, seq: c.receive_reply(seq, interruptible=False),
}


@pytest.mark.parametrize(
    ("request_kind", "reply_kind", "fields"),
    [
        ("hello", "welcome", {"config": OLD_WELCOME}),
        ("pull", "params", {}),
        ("pull", "not_modified", {}),
        ("push", "ack", {"accepted": True, "reason": None}),
        ("stop", "ack", {"accepted": True, "reason": None}),
        ("hello", "error", {"reason": "bad_token", "message": "wrong run token"}),
    ],
)
def test_a_reply_of_protocol_2_says_the_server_speaks_another_wire_protocol(
    stand_in, request_kind, reply_kind, fields
):
    """Catches a client that reports a server of the previous release as a bad reply, a
    missing field or a KeyError: whatever the reply, its version is looked at first, and
    the error names the server, both versions and what to do."""
    router, connection = stand_in
    seq = SENDS[request_kind](connection)
    request = answer(router, protocol_2_reply(reply_kind, **fields))
    assert request["protocol"] == transport.PROTOCOL_VERSION
    with pytest.raises(ServerError, match="another wire protocol") as caught:
        RECEIVES[request_kind](connection, seq)
    message = str(caught.value)
    assert "protocol 2, expected 4" in message and connection.endpoint in message
    assert "same gorila_jax version" in message and not caught.value.lost


def test_an_error_reply_bad_protocol_says_the_server_speaks_another_wire_protocol(stand_in):
    """A server of this protocol's replies that refuses the request's protocol (a bundle
    newer than the server, say) answers "bad_protocol": named as another wire protocol,
    with the server's message; any other error stays a refusal."""
    router, connection = stand_in

    def error(reason: str, message: str):
        return lambda request: transport.encode(
            transport.reply_header(
                request, "error", version=0, fingerprint="f" * 32, reason=reason,
                message=message,
            )
        )  # fmt: skip

    seq = connection.send_request("hello")
    answer(router, error("bad_protocol", "protocol 5, expected 4"))
    with pytest.raises(ServerError, match="another wire protocol") as caught:
        connection.receive_reply(seq)
    assert "protocol 5, expected 4" in str(caught.value)
    seq = connection.send_request("hello")
    answer(router, error("bad_credential", "not worker 0's credential"))
    with pytest.raises(ServerError, match="server refused hello: bad_credential") as caught:
        connection.receive_reply(seq)
    assert "another wire protocol" not in str(caught.value)


def send_as_protocol_2(connection: ServerConnection, kind: str) -> int:
    """Send `kind` as a bundle of protocol 2 would (its version; the rest as this one's:
    the server looks at the version first), pending on `connection`; returns its seq."""
    connection.seq += 1
    header = transport.make_header(
        kind, credential=connection.credential, worker=connection.worker, seq=connection.seq,
        version=-1, fingerprint=connection.fingerprint,
    ) | {"protocol": 2, "arrays": 0}  # fmt: skip
    connection.socket.send(msgpack.packb(header))
    connection._pending[connection.seq] = (kind, time.monotonic() + connection.timeout_seconds)
    return connection.seq


def test_the_server_refuses_a_protocol_2_request_and_the_client_says_why(served):
    """End to end: the server answers a request of protocol 2 with "bad_protocol" naming
    both versions, which the client turns into the one line that says the server speaks
    another wire protocol; nothing of the worker's moved, and it goes on in this protocol."""
    server, connection = served
    seq = send_as_protocol_2(connection, "hello")
    with pytest.raises(ServerError, match="another wire protocol") as caught:
        connection.receive_reply(seq)
    assert "(protocol 2, expected 4)" in str(caught.value)
    stats = server.stats()
    assert stats["rejections"] == {"bad_protocol": 1}
    assert stats["unauthenticated"] == {"rejected": 1} and stats["workers"] == {}
    assert connection.hello()[1] == 0


def test_a_pull_joins_the_fresh_slices_with_the_ones_not_modified():
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, layout)
    second.fresh = 5.0  # only shard 1 has newer params
    learner = sharded_learner(first, second)
    before = learner.client.initial.flat
    learner.client.push(Push(np.ones(58, np.float32), 0.5, (0, 0), 0, pull=True))
    learner.close()
    assert learner.client.error is None
    flat = flat_params(learner.acting_params())
    np.testing.assert_array_equal(flat[:29], 0.0)
    np.testing.assert_array_equal(flat[29:], 5.0)
    assert learner.state.params_versions == (0, 1)  # shard 1's version came with its slice
    np.testing.assert_array_equal(before, 0.0)  # a new vector; the old one is left as it was


def test_a_welcome_of_another_layout_fails_and_closes_every_connection():
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, ShardLayout.even(58, 3))
    with pytest.raises(ServerError, match="server shard 1 answered as shard 1 of layout"):
        sharded_learner(first, second)
    assert first.calls[-1] == "close" and second.calls[-1] == "close"


@pytest.mark.parametrize("name", client_module.WELCOME_FIELDS)
def test_a_welcome_missing_a_field_is_refused_and_closes_every_connection(name):
    """Catches a client that fills in a default for a field a server left out (protocol 2's
    welcome had no part_size: its default would push the wrong part)."""
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, layout)
    second.welcome = {name: MISSING}
    with pytest.raises(ServerError, match=f"bad welcome from server shard 1: {name} None"):
        sharded_learner(first, second)
    assert first.calls[-1] == "close" and second.calls[-1] == "close"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_params", -1),
        ("num_params", 29.0),
        ("server_shard", True),
        ("server_shard", "1"),
        ("shard_layout", [0, 29.0, 58]),
        ("shard_layout", "0,29,58"),
        ("shard_layout", [0, True, 58]),
        ("num_workers", None),
        ("part_size", -29),
        ("part_size", "29"),
        ("frames", -1),
        ("frames", True),
        ("frames", 2.5),
    ],
)
def test_a_welcome_field_of_the_wrong_type_is_refused(name, value):
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, layout)
    second.welcome = {name: value}
    with pytest.raises(ServerError, match=f"bad welcome from server shard 1: {name} "):
        sharded_learner(first, second)
    assert first.calls[-1] == "close" and second.calls[-1] == "close"


def test_a_protocol_2_welcome_is_refused():
    """Protocol 2's welcome said shard and shard_size where protocol 3's says part_size."""
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, layout)
    second.welcome = {"part_size": MISSING, "shard": None, "shard_size": 29}
    with pytest.raises(ServerError, match="bad welcome from server shard 1: part_size None"):
        sharded_learner(first, second)


def test_a_welcome_of_another_gradient_part_fails():
    layout = ShardLayout.even(58, 2)
    first, second = ShardConnection(0, layout), ShardConnection(1, layout)
    second.welcome = {"part_size": 28}
    with pytest.raises(ServerError, match="gradient part differs"):
        sharded_learner(first, second)
    assert first.calls[-1] == "close" and second.calls[-1] == "close"


def test_the_servers_welcome_is_one_the_client_accepts(served):
    """The server's welcome has exactly the fields the client requires, of their types."""
    server, connection = served
    _, _, info = connection.hello()
    assert set(info) == set(client_module.WELCOME_FIELDS)
    layout = ShardLayout.even(server.num_params, 1)
    client = client_module.ShardedClient(
        [connection], layout=layout, pieces=[layout.slice(0)], target_period=100,
        retry_seconds=1.0,
    )  # fmt: skip
    try:
        assert client.initial.versions == (0,) and client.start_frames == 0
    finally:
        client.close(timeout_seconds=10)
    assert server.all_workers_stopped()


class RecordingConnection(FakeConnection):
    """A FakeConnection that keeps every pushed gradient with its fields."""

    def __init__(self, num_params: int):
        super().__init__(num_params)
        self.pushed: list[tuple[np.ndarray, dict]] = []

    def send_push(self, grads, **fields) -> int:
        self.pushed.append((np.array(grads), fields))
        return super().send_push(grads, **fields)


def test_push_every_pushes_the_mean_of_k_gradients_with_the_oldest_versions():
    """Catches a --push-every that pushes the sum (over the clip: the server refuses it),
    drops or repeats a gradient, stamps the newest params version on a mean that holds
    older gradients, or loses the last incomplete group at close."""
    from types import SimpleNamespace

    connection = RecordingConnection(num_params=58)
    learner, _ = remote_learner(connection, push_every=3, sync_every=1000)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=58).astype(np.float32) for _ in range(7)]
    steps = iter(zip(grads, range(1, 8), strict=True))

    def fake_step(params, target, batch, weights):
        g, td = next(steps)
        return jax.numpy.asarray(g), SimpleNamespace(mean_abs_td=float(td))

    learner._grad_step = fake_step
    sample = SimpleNamespace(transition=np.zeros(8, np.float32), weights=np.ones(8, np.float32))
    try:
        for step in range(7):
            # a pull between the learner's steps
            learner.state = learner.state._replace(params_versions=(10 + step,))
            learner.learn(sample, frames=step)
    finally:
        learner.close()
    pushed = connection.pushed
    assert len(pushed) == 3  # 3 + 3 + the 1 left at close
    groups = ([0, 1, 2], [3, 4, 5], [6])
    for (sent, fields), group, first in zip(pushed, groups, (0, 3, 6), strict=True):
        np.testing.assert_allclose(sent, np.mean([grads[i] for i in group], axis=0), rtol=1e-6)
        assert set(fields) == {"base_version", "mean_abs_td", "frames"}  # no shard, no loss
        assert fields["base_version"] == 10 + first
        assert fields["mean_abs_td"] == pytest.approx(np.mean([i + 1 for i in group]))


class VersionedServer(FakeConnection):
    """A FakeConnection whose server moves `per_push` versions with every push it acks (the
    other bundles' pushes included) and answers a pull with params filled with the version
    when it is newer than the one the bundle has (have_version -1: always)."""

    def __init__(self, num_params: int, per_push: int):
        super().__init__(num_params)
        self.version, self.per_push = 0, per_push
        self.asked: list[int] = []  # have_version of every pull

    def receive_ack(self, seq: int, **_):
        self._record("receive_ack")
        self.version += self.per_push
        return True, None, self.version

    def send_pull(self, have_version: int) -> int:
        self.asked.append(have_version)
        return super().send_pull(have_version)

    def receive_pulled(self, seq: int, **_):
        self._record("receive_pulled")
        if self.asked[-1] >= self.version:
            return None, self.version
        return np.full(self.num_params, float(self.version), np.float32), self.version


def settled(learner: RemoteLearner, connection: FakeConnection) -> None:
    """Wait until the communication thread has pushed everything queued and done any pull
    asked for: every learner step's push acknowledged, nothing queued or in flight, no pull
    wanted, and no new call for 150 ms."""
    deadline = time.monotonic() + 10
    seen = -1
    while True:
        assert time.monotonic() < deadline, "the communication thread did not settle"
        acked = [name for name, _ in connection.calls].count("receive_ack") == learner.updates
        client = learner.client
        quiet = acked and client._outbox.empty() and not client._pulling
        quiet = quiet and not any(s.in_flight or s.backlog for s in client._shards)
        quiet = quiet and not client._pull_wanted
        if quiet and len(connection.calls) == seen:
            return
        seen = len(connection.calls)
        time.sleep(0.15)


def test_pulls_every_sync_every_steps_and_refreshes_the_target_every_target_period():
    """Unit level, a fake server moving 3 versions per push (two other bundles): a plain
    pull after every `sync_every` (4) learner steps and only then (a refresh due at the
    same time serves it); a target refresh (a pull of whatever version, -1) as soon as an
    ack takes the server past a multiple of `target_period` (10), once per multiple; the
    target network is those params until the next refresh, while plain pulls move only the
    acting params. Catches a pull cadence off by one or counted in pushes or server
    versions, a refresh counted in this bundle's steps (every 10 of them: 3 times too rare
    here), a refresh on every pull, a target taken from a plain pull, and a refresh that
    never comes when the server skips past a multiple."""
    from types import SimpleNamespace

    connection = VersionedServer(num_params=58, per_push=3)
    learner, _ = remote_learner(connection, sync_every=4, target_period=10, push_every=1)
    learner._grad_step = lambda *args: (
        jax.numpy.zeros(58, np.float32), SimpleNamespace(mean_abs_td=0.0)
    )  # fmt: skip
    sample = SimpleNamespace(transition=np.zeros(8, np.float32), weights=np.ones(8, np.float32))
    np.testing.assert_array_equal(flat_params(learner.target_params), 0.0)  # the welcome's
    trace = []  # per step: (server version, plain pulls, refreshes, target's value)
    try:
        for _ in range(12):
            learner.learn(sample)
            settled(learner, connection)
            learner.acting_params()  # the main thread takes what was pulled
            target = flat_params(learner.target_params)
            assert np.all(target == target[0])
            plain = sum(1 for have in connection.asked if have != -1)
            refreshes = connection.asked.count(-1)
            trace.append((connection.version, plain, refreshes, float(target[0])))
    finally:
        learner.close()
    versions = [v for v, *_ in trace]
    assert versions == list(range(3, 37, 3))
    # Refreshes when an ack passes 10 (step 4: 12), 20 (step 7: 21) and 30 (step 10: 30);
    # a sync pull after steps 4 (the refresh serves it), 8 and 12.
    assert [r for *_, r, _ in trace] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [p + r for _, p, r, _ in trace] == [0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5]
    assert [t for *_, t in trace] == [0.0] * 3 + [12.0] * 3 + [21.0] * 3 + [30.0] * 3
    # The acting params follow every pull, the plain ones too (step 12: version 36).
    assert learner.params_version == 36
    np.testing.assert_array_equal(flat_params(learner.params), 36.0)


def test_a_reply_that_arrived_is_not_lost_to_its_deadline(served):
    """A reply already waiting in the socket is an answer, whatever the clock says: while
    a bundle's thread waited on another shard, this shard's reply came and its deadline
    passed. The old order (deadline first, socket second) called it lost and said hello
    to a healthy shard again."""
    server, connection = served
    connection.hello()
    connection.timeout_seconds = 0.3
    seq = connection.send_pull(-1)
    assert connection._socket.poll(10_000), "no reply from the server in 10 s"
    time.sleep(0.4)  # the reply is in the socket; now its deadline is past too
    flat, version = connection.receive_pulled(seq, wait=False)
    assert version == 0 and len(flat) == server.num_params


def test_the_awake_clock_leaves_out_a_gap_the_process_did_not_run(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: now[0])
    clock = client_module.AwakeClock(max_gap=5.0)
    start = clock()
    for step in (0.1, 4.9, 0.1):  # gaps up to max_gap count in full
        now[0] += step
        clock()
    assert clock() - start == pytest.approx(5.1)
    now[0] += 1800.0  # a job suspended for half an hour
    assert clock() - start == pytest.approx(10.1)
    assert clock.skipped == pytest.approx(1795.0)
    now[0] += 0.05
    assert clock() - start == pytest.approx(10.15)


def test_time_the_bundle_did_not_run_is_not_taken_for_the_servers_silence(served):
    """A request pending while its own process was stopped (SIGSTOP, a suspended job) past
    its deadline is still waited for: only the gap's first `max_gap` seconds count. The
    server answers nothing here, so the request is lost once the server's own silence
    passes the timeout; with the plain clock (max_gap 5 s) the same stop is a loss at once."""
    server, connection = served
    connection.hello()
    server.submit = lambda *args: []  # a server that answers nothing
    connection.timeout_seconds = 1.0
    connection.clock = client_module.AwakeClock(max_gap=0.2)
    seq = connection.send_pull(-1)
    time.sleep(1.5)  # this thread does not run: no reading of the clock
    assert connection.receive_reply(seq, wait=False) is None
    started = time.monotonic()
    with pytest.raises(ServerError, match="no reply") as lost:
        connection.receive_reply(seq)
    assert lost.value.lost and 0.5 < time.monotonic() - started < 5

    connection.clock = client_module.AwakeClock()
    seq = connection.send_pull(-1)
    time.sleep(1.5)
    with pytest.raises(ServerError, match="no reply"):
        connection.receive_reply(seq, wait=False)


class CutShard(ShardConnection):
    """A shard whose acks stop coming (a partition), without ever timing out in the
    test's time: `receive_ack` answers "not yet" while `cut` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cut = threading.Event()
        self.cut.set()

    def receive_ack(self, seq: int, **_):
        if self.cut.is_set():
            return None
        return super().receive_ack(seq)


def test_a_shard_that_does_not_answer_delays_only_its_own_slice(monkeypatch):
    """Each shard has its own window: with shard 1's acks held back past STALLED_SECONDS,
    shard 0 still gets every push, shard 1 keeps only its newest slices (the oldest are
    dropped and counted as `behind`), and once it answers again it gets what it kept.
    Catches pushes acknowledged shard after shard in one queue (shard 0 then waits for
    shard 1 forever), and a backlog that grows without bound or drops the newest."""
    monkeypatch.setattr(client_module, "STALLED_SECONDS", 0.3)
    layout = ShardLayout.even(58, 2)
    healthy, cut = ShardConnection(0, layout), CutShard(1, layout)
    learner = sharded_learner(healthy, cut)
    try:
        for value in range(10):
            learner.client.push(Push(np.full(58, float(value), np.float32), 0.5, (0, 0), 0))
        deadline = time.monotonic() + 10
        while len(healthy.pushed) < 10:
            assert time.monotonic() < deadline, f"shard 0 got {len(healthy.pushed)} of 10"
            time.sleep(0.01)
        shard = learner.client._shards[1]
        assert len(shard.in_flight) == 2 and len(shard.backlog) == 2  # windows, bounded
        assert [item.grads[0] for _, _, item in shard.backlog] == [8.0, 9.0]  # the newest
    finally:
        cut.cut.clear()
        learner.close()
    assert learner.client.error is None
    assert len(cut.pushed) == 4  # the 2 in flight and the 2 newest
    assert learner.rejected == {"behind": 6} and learner.accepted == 4


def test_a_slower_shard_that_answers_holds_the_others_back_and_loses_nothing(monkeypatch):
    """Shards keep step while they answer: shard 1 acknowledging late (within
    STALLED_SECONDS) slows the pushes to shard 0 instead of losing its own slices, and the
    gradients wait in the bundle's queue, not in a second queue per shard. Catches a
    backlog that drops a merely slow shard's gradients (most of every push refused as
    `behind` on a loaded machine: CartPole then no longer learns), and gradients taken off
    the queue before every shard has room to send them (they then wait twice: staler
    pushes, and Pong no longer learned). STALLED_SECONDS is raised so that a loaded
    machine's pauses never make the slow shard count as stalled."""
    monkeypatch.setattr(client_module, "STALLED_SECONDS", 60.0)
    layout = ShardLayout.even(58, 2)
    healthy, slow = ShardConnection(0, layout), CutShard(1, layout)
    learner = sharded_learner(healthy, slow)
    try:
        for value in range(4):  # two to send at once, two for the queue: none blocks
            learner.client.push(Push(np.full(58, float(value), np.float32), 0.5, (0, 0), 0))
        deadline = time.monotonic() + 10
        while len(healthy.pushed) < 2:
            assert time.monotonic() < deadline, f"shard 0 got {len(healthy.pushed)} of 2"
            time.sleep(0.01)
        time.sleep(0.3)  # time for more to go out, were the slow shard not holding them
        assert len(healthy.pushed) == 2  # the window's two, not all four
        assert learner.client._outbox.qsize() == 2
        assert not any(shard.backlog for shard in learner.client._shards)
    finally:
        slow.cut.clear()
        learner.close()
    assert len(healthy.pushed) == len(slow.pushed) == 4
    assert learner.rejected == {} and learner.accepted == 4


def test_a_pull_goes_out_at_once_not_behind_the_queued_gradients(monkeypatch):
    """A push that asks for a pull while earlier gradients wait for the server's acks:
    the pull is sent on the thread's next turn, before those gradients (the params come
    back as fresh as the server's). Catches a pull sent only once its push leaves the
    queue: every pull then waited for the acks of the gradients ahead of it. (The shard is
    never stalled here: STALLED_SECONDS is raised past the test's deadlines.)"""
    monkeypatch.setattr(client_module, "STALLED_SECONDS", 60.0)
    layout = ShardLayout.even(58, 1)
    slow = CutShard(0, layout)
    learner = sharded_learner(slow, server_shards=1)
    try:
        for value in range(3):  # two in flight (not acknowledged), one queued
            learner.client.push(Push(np.full(58, float(value), np.float32), 0.5, (0,), 0))
        learner.client.push(Push(np.full(58, 3.0, np.float32), 0.5, (0,), 0, pull=True))
        deadline = time.monotonic() + 10.0  # within STALLED_SECONDS: the shard answers
        while "send_pull" not in slow.calls:
            assert time.monotonic() < deadline, f"no pull sent: {slow.calls}"
            time.sleep(0.01)
        assert slow.calls.count("send_push") == 2  # the queued two are still waiting
        assert learner.client._outbox.qsize() == 2
    finally:
        slow.cut.clear()
        learner.close()
    assert learner.accepted == 4 and learner.rejected == {}


class CutPulls(ShardConnection):
    """A shard whose pull replies do not come while `cut` is set (its acks do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cut = threading.Event()
        self.cut.set()

    def receive_pulled(self, seq: int, **_):
        if self.cut.is_set():
            return None
        return super().receive_pulled(seq)


def test_a_cut_shard_does_not_hold_back_the_others_params(monkeypatch):
    """A pull asks every shard; shard 1 does not answer: once its pull is stalled, shard
    0's fresh slice is handed over alone, and shard 1's, when it comes, with a later pull.
    Catches a pull that waits for every shard (the bundle then acts on params as old as
    the cut is long, and its pushes to the reachable shard go stale)."""
    monkeypatch.setattr(client_module, "STALLED_SECONDS", 0.3)
    layout = ShardLayout.even(58, 2)
    healthy, cut = ShardConnection(0, layout), CutPulls(1, layout)
    healthy.fresh, cut.fresh = 3.0, 4.0
    learner = sharded_learner(healthy, cut)
    try:
        learner.client.push(Push(np.ones(58, np.float32), 0.5, (0, 0), 0, pull=True))
        deadline = time.monotonic() + 10
        while (flat := flat_params(learner.acting_params()))[0] != 3.0:
            assert time.monotonic() < deadline, "shard 0's slice was held back"
            time.sleep(0.02)
        np.testing.assert_array_equal(flat[:29], 3.0)
        np.testing.assert_array_equal(flat[29:], 0.0)  # shard 1's not come yet
        cut.cut.clear()
        learner.client.push(Push(np.ones(58, np.float32), 0.5, (0, 0), 0, pull=True))
        while (flat := flat_params(learner.acting_params()))[29] != 4.0:
            assert time.monotonic() < deadline, "shard 1's late slice never came"
            time.sleep(0.02)
        np.testing.assert_array_equal(flat[:29], 3.0)
    finally:
        cut.cut.clear()
        learner.close()
    assert learner.client.error is None
