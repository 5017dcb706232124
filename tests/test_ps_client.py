"""The bundle's connection: several requests in flight, replies matched by sequence number."""

import dataclasses
import threading

import jax
import numpy as np
import pytest
import zmq

from gorila_jax import transport
from gorila_jax.config import cartpole_defaults
from gorila_jax.networks import MLP
from gorila_jax.parameter_server import ParameterServer
from gorila_jax.ps_client import ServerConnection, ServerError


@pytest.fixture
def served(tmp_path):
    config = dataclasses.replace(cartpole_defaults(), optimizer="sgd", max_grad_norm=0.0)
    params = MLP(num_actions=2, hidden=(8,)).init(jax.random.key(0), np.zeros((1, 4)))
    server = ParameterServer(config, params, num_workers=1, token="k" * 64, run_dir=tmp_path)
    sock, endpoint = transport.make_server_socket(
        zmq.Context.instance(), "tcp://127.0.0.1:0", server.max_bytes
    )
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock, endpoint, stop.is_set))
    thread.start()
    connection = ServerConnection(
        endpoint, token=server.token, worker=0, fingerprint=server.fingerprint,
        num_params=server.num_params, max_bytes=server.max_bytes, timeout_seconds=5.0,
    )  # fmt: skip
    yield server, connection
    connection.close()
    stop.set()
    thread.join(timeout=10)
    sock.close(linger=0)


def test_pushes_in_flight_and_a_pull_between_them(served):
    server, connection = served
    flat, version, _ = connection.hello()
    grads = [np.full(server.num_params, value, np.float32) for value in (1.0, 2.0)]
    first = connection.send_push(grads[0], base_version=version, loss=0.1, frames=4, shard=None)
    second = connection.send_push(grads[1], base_version=version, loss=0.1, frames=8, shard=None)
    params, pulled_version = connection.pull(-1)  # its reply arrives after both acks
    assert pulled_version == 2
    assert connection.receive_ack(second) == (True, None, 2)
    assert connection.receive_ack(first) == (True, None, 1)
    learning_rate = server.config.learning_rate
    np.testing.assert_allclose(params, flat - learning_rate * 3.0, rtol=1e-6)


def test_a_reply_that_never_comes_is_lost_and_cancel_stops_waiting(served):
    server, connection = served
    connection.hello()
    seq = connection.send_request("stats")
    connection.cancel.set()
    with pytest.raises(ServerError, match="cancelled"):
        connection.receive_reply(seq)
    connection.cancel.clear()
    connection.timeout_seconds = 0.5
    server.handle = lambda frames: []  # a server that answers nothing
    with pytest.raises(ServerError, match="no reply") as lost:
        connection.request("stats")
    assert lost.value.lost
