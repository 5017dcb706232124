"""Tests for gorila_jax.wire.transport: encoding, validation, fingerprints, shards and sockets."""

import random
import weakref

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import zmq

from gorila_jax.core.gradient_shards import shard_indices
from gorila_jax.wire import transport
from gorila_jax.wire.transport import ArraySpec, ProtocolError

TOKEN = transport.new_run_token()
MAX_BYTES = 1 << 20


def example_tree(rng: np.random.Generator | None = None) -> dict:
    rng = rng or np.random.default_rng(0)
    return {
        "conv": {
            "b": rng.standard_normal(4).astype(np.float32),
            "w": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        },
        "dense": [
            rng.standard_normal((8, 5)).astype(np.float32),
            rng.standard_normal(5).astype(np.float32),
        ],
        "steps": np.array(7, dtype=np.int32),
    }


def leaves_of(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as numpy arrays, in canonical order (the frames' order)."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def specs_of(tree) -> tuple[ArraySpec, ...]:
    """What a receiver expects for the leaves of ``tree``: one spec per frame."""
    return tuple(ArraySpec(leaf.shape, leaf.dtype) for leaf in leaves_of(tree))


SPECS = specs_of(example_tree())
FINGERPRINT = transport.tree_fingerprint(example_tree())
# Two shards of whole leaves, of different frame counts, for a receiver whose frames
# depend on the header: shard 0 is conv.w, shard 1 every other leaf.
LEAF_SHARDS = ((1,), (0, 2, 3, 4))


def shard_specs(shard: int) -> tuple[ArraySpec, ...]:
    return tuple(SPECS[i] for i in LEAF_SHARDS[shard])


def layout_for(header: dict):
    """The receiver-side layout callback used throughout the tests."""
    if header["kind"] in ("params", "welcome"):
        return SPECS if header["arrays"] else None
    if header["kind"] == "push":
        shard = header["shard"]
        if shard is None:
            return SPECS
        if shard >= len(LEAF_SHARDS):
            raise ProtocolError("bad_shard", f"no shard {shard}")
        return shard_specs(shard)
    return None


def header_for(kind: str, **fields) -> dict:
    """A request header (with the token) or a reply header (without one)."""
    common = {"worker": 3, "seq": 11, "version": 5, "fingerprint": FINGERPRINT}
    if kind in transport.REQUEST_KINDS:
        return transport.make_header(kind, **({"token": TOKEN} | common | fields))
    return {"kind": kind, **(common | fields)}


# What the server's welcome says (ParameterServer._on_hello).
WELCOME_CONFIG = {"num_params": 351, "num_workers": 2, "shard": 1, "shard_size": 176, "frames": 0}


def sample_messages() -> dict[str, tuple[dict, list[np.ndarray]]]:
    leaves = leaves_of(example_tree())
    shard_arrays = [leaves[i] for i in LEAF_SHARDS[1]]
    return {
        "hello": (header_for("hello"), []),
        "welcome": (header_for("welcome", config=WELCOME_CONFIG), []),
        "pull": (header_for("pull", version=transport.NO_VERSION), []),
        "params": (header_for("params"), leaves),
        "not_modified": (header_for("not_modified"), []),
        "push": (header_for("push", loss=0.25, shard=None, frames=1234), leaves),
        "push_shard": (header_for("push", loss=1.5, shard=1, frames=99), shard_arrays),
        "ack": (header_for("ack", accepted=False, reason="stale"), []),
        "error": (header_for("error", reason="bad_frames", message="array 2 short"), []),
        "stats": (header_for("stats"), []),
        "stop": (header_for("stop"), []),
        "stats_reply": (
            header_for("stats_reply", stats={"version": 5, "rates": [1.5, 2.0], "x": None}),
            [],
        ),
    }


def decode(frames, **overrides):
    """Decode a request as the server does."""
    options = {
        "expected_token": TOKEN,
        "expected_fingerprint": FINGERPRINT,
        "layout_for": layout_for,
        "max_bytes": MAX_BYTES,
    }
    options.update(overrides)
    return transport.decode(frames, **options)


def decode_reply(frames, **overrides):
    """Decode a reply as a bundle does."""
    options = {
        "expected_fingerprint": FINGERPRINT,
        "layout_for": layout_for,
        "max_bytes": MAX_BYTES,
    }
    options.update(overrides)
    return transport.decode_reply(frames, **options)


def decode_any(frames, kind: str):
    return (decode if kind in transport.REQUEST_KINDS else decode_reply)(frames)


def to_wire(frames) -> list[bytes]:
    return [bytes(frame) for frame in frames]


def assert_same_message(message, header, arrays):
    for key, value in header.items():
        assert message.header[key] == value
    assert message.header["protocol"] == transport.PROTOCOL_VERSION
    assert message.header["arrays"] == len(arrays)
    assert len(message.arrays) == len(arrays)
    for got, sent in zip(message.arrays, arrays, strict=True):
        assert got.shape == sent.shape and got.dtype == sent.dtype
        assert got.tobytes() == np.ascontiguousarray(sent).tobytes()


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sample_messages()))
def test_round_trip_every_kind(name):
    header, arrays = sample_messages()[name]
    message = decode_any(to_wire(transport.encode(header, arrays)), header["kind"])
    assert_same_message(message, header, arrays)
    assert ("token" in message.header) == (header["kind"] in transport.REQUEST_KINDS)
    assert all(not array.flags.writeable for array in message.arrays)


def test_every_kind_is_sampled():
    assert {header["kind"] for header, _ in sample_messages().values()} == transport.KINDS


def test_encode_does_not_copy_contiguous_little_endian_arrays():
    array = np.arange(12, dtype="<f4").reshape(3, 4)
    frames = transport.encode(header_for("params"), [array])
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), array)


def test_encode_converts_big_endian_and_non_contiguous_arrays():
    leaves = leaves_of(example_tree())
    sent = [leaf.astype(leaf.dtype.newbyteorder(">")) for leaf in leaves]
    sent[1] = np.asfortranarray(sent[1])
    message = decode_reply(to_wire(transport.encode(header_for("params"), sent)))
    for got, leaf in zip(message.arrays, leaves, strict=True):
        np.testing.assert_array_equal(got, leaf)


def test_jax_arrays_encode_like_numpy():
    tree = example_tree()
    jax_tree = jax.tree.map(jnp.asarray, tree)
    frames_np = to_wire(transport.encode(header_for("params"), leaves_of(tree)))
    frames_jax = to_wire(transport.encode(header_for("params"), leaves_of(jax_tree)))
    assert frames_np == frames_jax


def test_decoded_arrays_rebuild_the_tree():
    tree = example_tree()
    message = decode_reply(to_wire(transport.encode(header_for("params"), leaves_of(tree))))
    rebuilt = jax.tree.unflatten(jax.tree.structure(tree), message.arrays)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(tree)
    for got, sent in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(got, sent)


def test_reply_header_echoes_request_but_never_a_token():
    request = header_for("pull")
    reply = transport.reply_header(request, "not_modified", version=9, fingerprint="f")
    assert (reply["worker"], reply["seq"], reply["version"]) == (3, 11, 9)
    assert "token" not in reply
    fallback = transport.reply_header(
        {"token": 5, "seq": -2}, "error", version=0, fingerprint="f", reason="malformed", message=""
    )
    assert (fallback["worker"], fallback["seq"]) == (0, 0) and "token" not in fallback
    transport.encode(fallback)


def test_requests_and_replies_are_not_interchangeable():
    # A reply carrying a token, or without one where a request is expected, is malformed.
    with pytest.raises(ProtocolError, match="unknown fields") as caught:
        decode_reply([packed({**_hello_dict(), "kind": "not_modified"})])
    assert caught.value.reason == "malformed"
    with pytest.raises(ProtocolError, match="not a reply"):
        decode_reply(to_wire(transport.encode(header_for("pull"))))
    with pytest.raises(ProtocolError, match="token") as caught:
        decode(to_wire(transport.encode(header_for("not_modified"))))
    assert caught.value.reason == "malformed" and not caught.value.authenticated
    with pytest.raises(ProtocolError, match="not a request") as caught:
        decode([packed({**_hello_dict(), "kind": "not_modified"})])
    assert caught.value.authenticated  # the token was right: the sender is the worker


def test_only_errors_after_the_token_check_are_authenticated():
    wrong_token = header_frame_with(_set("token", "0" * 64))
    wrong_fingerprint = header_frame_with(_set("fingerprint", "x"))
    with pytest.raises(ProtocolError) as before:
        decode(wrong_token)
    with pytest.raises(ProtocolError) as after:
        decode(wrong_fingerprint)
    assert (before.value.reason, before.value.authenticated) == ("bad_token", False)
    assert (after.value.reason, after.value.authenticated) == ("bad_fingerprint", True)


def test_new_run_token():
    token = transport.new_run_token()
    assert len(token) == 64 and int(token, 16) >= 0
    assert token != transport.new_run_token()


# --------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------


def valid_push_frames() -> list[bytes]:
    header, arrays = sample_messages()["push"]
    return to_wire(transport.encode(header, arrays))


def packed(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def header_frame_with(change) -> list[bytes]:
    """A valid hello whose decoded header is passed through ``change`` and repacked."""
    header = msgpack.unpackb(to_wire(transport.encode(header_for("hello")))[0])
    change(header)
    return [packed(header)]


def _without(name):
    return lambda header: header.pop(name)


def _set(name, value):
    return lambda header: header.__setitem__(name, value)


REJECTIONS = {
    "wrong_token": ("bad_token", lambda: header_frame_with(_set("token", "0" * 64))),
    "non_ascii_token": ("bad_token", lambda: header_frame_with(_set("token", "é" * 64))),
    "wrong_fingerprint": ("bad_fingerprint", lambda: header_frame_with(_set("fingerprint", "x"))),
    "truncated_frames": ("bad_frames", lambda: valid_push_frames()[:-1]),
    "extra_frames": ("bad_frames", lambda: [*valid_push_frames(), b"\0" * 16]),
    "short_frame": ("bad_frames", lambda: _replace_frame(2, lambda f: f[:-4])),
    "long_frame": ("bad_frames", lambda: _replace_frame(2, lambda f: f + b"\0" * 4)),
    "arrays_where_none_expected": (
        "bad_frames",
        lambda: to_wire(transport.encode(header_for("hello"), [np.zeros(3, np.float32)])),
    ),
    "unknown_shard": (
        "bad_shard",
        lambda: to_wire(
            transport.encode(header_for("push", loss=0.0, shard=7, frames=0), [np.zeros(2)])
        ),
    ),
    "header_not_msgpack": ("malformed", lambda: [b"\xc1\xc1\xc1"]),
    "header_truncated": ("malformed", lambda: [valid_push_frames()[0][:-3]]),
    "header_with_trailing_bytes": ("malformed", lambda: [valid_push_frames()[0] + b"\x00"]),
    "header_empty": ("malformed", lambda: [b""]),
    "header_a_list": ("malformed", lambda: [packed([1, 2, 3])]),
    "header_an_int": ("malformed", lambda: [packed(7)]),
    "header_with_ext_type": ("malformed", lambda: [packed({"a": msgpack.ExtType(5, b"x")})]),
    "header_deeply_nested": ("malformed", lambda: [b"\x91" * 5000 + b"\xc0"]),
    "header_int_key": ("malformed", lambda: [b"\x81\x01\x01"]),
    "no_frames": ("malformed", lambda: []),
    "missing_field": ("malformed", lambda: header_frame_with(_without("seq"))),
    "missing_kind_field": (
        "malformed",
        lambda: [packed({**_hello_dict(), "kind": "ack", "accepted": True})],
    ),
    "unknown_field": ("malformed", lambda: header_frame_with(_set("extra", 1))),
    "wrong_type_str_for_int": ("malformed", lambda: header_frame_with(_set("worker", "3"))),
    "wrong_type_bool_for_int": ("malformed", lambda: header_frame_with(_set("seq", True))),
    "negative_worker": ("malformed", lambda: header_frame_with(_set("worker", -1))),
    "version_below_none": ("malformed", lambda: header_frame_with(_set("version", -2))),
    "token_not_str": ("malformed", lambda: header_frame_with(_set("token", b"abc"))),
    "unknown_kind": ("malformed", lambda: header_frame_with(_set("kind", "gossip"))),
    "kind_not_str": ("malformed", lambda: header_frame_with(_set("kind", None))),
    "wrong_protocol": (
        "bad_protocol",
        lambda: header_frame_with(_set("protocol", transport.PROTOCOL_VERSION - 1)),
    ),
    "protocol_missing": ("malformed", lambda: header_frame_with(_without("protocol"))),
    "arrays_count_negative": ("malformed", lambda: header_frame_with(_set("arrays", -1))),
    "header_too_big": (
        "oversized",
        lambda: [packed({"pad": "x" * transport.MAX_HEADER_BYTES})],
    ),
}


def _hello_dict() -> dict:
    return msgpack.unpackb(to_wire(transport.encode(header_for("hello")))[0])


def _replace_frame(index: int, change) -> list[bytes]:
    frames = valid_push_frames()
    frames[index] = change(frames[index])
    return frames


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejections(name):
    reason, make_frames = REJECTIONS[name]
    with pytest.raises(ProtocolError) as caught:
        decode(make_frames(), max_bytes=4 * transport.MAX_HEADER_BYTES)
    assert caught.value.reason == reason, caught.value


def test_wrong_field_type_for_kind_specific_fields():
    header = _hello_dict() | {"kind": "push", "loss": "high", "shard": None, "frames": 0}
    with pytest.raises(ProtocolError, match="loss") as caught:
        decode([packed(header)])
    assert caught.value.reason == "malformed"
    assert caught.value.header["kind"] == "push"


def test_oversized_message_rejected_before_parsing():
    frames = valid_push_frames()
    total = sum(len(frame) for frame in frames)
    decode(frames, max_bytes=total)
    with pytest.raises(ProtocolError) as caught:
        decode(frames, max_bytes=total - 1)
    assert caught.value.reason == "oversized"
    assert caught.value.header is None


def test_fingerprint_check_can_be_skipped():
    frames = header_frame_with(_set("fingerprint", "somebody else's model"))
    assert decode(frames, expected_fingerprint=None).header["kind"] == "hello"


def test_encode_rejects_bad_headers():
    with pytest.raises(ProtocolError, match="frames"):
        transport.encode(header_for("push", loss=0.1, shard=None, frames=np.int64(3)))
    with pytest.raises(ProtocolError, match="missing"):
        transport.encode(header_for("push", loss=0.1, shard=None))
    with pytest.raises(ProtocolError, match="msgpack"):
        transport.encode(header_for("stats_reply", stats={"rate": np.float32(1.0)}))
    with pytest.raises(ProtocolError) as caught:
        transport.encode(header_for("stats_reply", stats={"pad": "x" * (1 << 17)}))
    assert caught.value.reason == "oversized"
    with pytest.raises(ValueError, match="raw bytes"):
        transport.encode(header_for("params"), [np.array([object()])])


def test_fuzzed_push_only_raises_protocol_error():
    rng = random.Random(1234)
    small = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    small_fingerprint = transport.tree_fingerprint(small)
    header = transport.make_header(
        "push",
        token=TOKEN,
        worker=1,
        seq=2,
        version=3,
        fingerprint=small_fingerprint,
        loss=0.5,
        shard=None,
        frames=10,
    )
    valid = to_wire(transport.encode(header, leaves_of(small)))

    def small_layout_for(decoded):
        if decoded["kind"] == "push" and decoded["shard"] is None:
            return specs_of(small)
        if decoded["kind"] == "push":
            raise ProtocolError("bad_shard", "no shards")
        return None

    reasons, accepted = {}, 0
    for _ in range(2000):
        frames = [bytearray(frame) for frame in valid]
        for _ in range(rng.randint(1, 3)):
            index = 0 if rng.random() < 0.7 else rng.randrange(len(frames))
            frame = frames[index]
            operation = rng.randrange(6)
            if operation == 0 and frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif operation == 1 and frame:
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            elif operation == 2:
                del frame[rng.randrange(len(frame) + 1) :]
            elif operation == 3:
                position = rng.randrange(len(frame) + 1)
                frame[position:position] = bytes(rng.randrange(256) for _ in range(4))
            elif operation == 4 and len(frames) > 1:
                del frames[rng.randrange(len(frames))]
            else:
                frames.append(bytearray(frames[rng.randrange(len(frames))]))
        try:
            transport.decode(
                [bytes(frame) for frame in frames],
                expected_token=TOKEN,
                expected_fingerprint=small_fingerprint,
                layout_for=small_layout_for,
                max_bytes=4096,
            )
            accepted += 1
        except ProtocolError as error:
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
    assert {"malformed", "bad_frames"} <= set(reasons), reasons
    assert sum(reasons.values()) > 1000, (reasons, accepted)


# --------------------------------------------------------------------------------------
# Fingerprints and shards
# --------------------------------------------------------------------------------------


def test_fingerprint_stable_across_numpy_jax_and_specs():
    tree = example_tree()
    jax_tree = jax.tree.map(jnp.asarray, tree)
    spec_tree = jax.tree.map(lambda a: ArraySpec(a.shape, a.dtype), tree)
    struct_tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    big_endian = jax.tree.map(lambda a: a.astype(a.dtype.newbyteorder(">")), tree)
    fingerprints = {
        transport.tree_fingerprint(t) for t in (tree, jax_tree, spec_tree, struct_tree, big_endian)
    }
    assert fingerprints == {FINGERPRINT}


def test_fingerprint_string_never_changes():
    """Checkpoints and the peers of a running server hold fingerprints: the same tree must
    keep giving the same string (this one is the value since protocol 1)."""
    assert FINGERPRINT == "7d20f16f547b5756e0e87e96995fbb35"
    assert transport.tree_fingerprint({}) == "4f53cda18c2baa0c0354bb5f9a3ecbe5"


def test_fingerprint_changes_with_shape_dtype_or_path():
    base = example_tree()
    changed_shape = example_tree()
    changed_shape["dense"][0] = np.zeros((8, 6), np.float32)
    changed_dtype = example_tree()
    changed_dtype["steps"] = np.array(7, dtype=np.int64)
    changed_path = example_tree()
    changed_path["convolution"] = changed_path.pop("conv")
    extra_leaf = example_tree()
    extra_leaf["dense"].append(np.zeros(1, np.float32))
    fingerprints = [
        transport.tree_fingerprint(t)
        for t in (base, changed_shape, changed_dtype, changed_path, extra_leaf)
    ]
    assert len(set(fingerprints)) == len(fingerprints)


def test_element_shards_round_trip():
    """Pushes of gradient shards (``gorila_jax.core.gradient_shards``): each a float32 frame
    whose length the receiver takes from the shard index; together, the whole vector."""
    vector = np.concatenate([leaf.astype(np.float32).ravel() for leaf in leaves_of(example_tree())])
    shards = [shard_indices(vector.size, 3, worker, "default", seed=42) for worker in range(3)]
    assert len({len(shard) for shard in shards}) > 1  # the last shard takes the remainder
    received = np.full_like(vector, np.nan)
    for index, shard in enumerate(shards):
        header = header_for("push", loss=0.0, shard=index, frames=0)
        message = decode(
            to_wire(transport.encode(header, [vector[shard]])),
            layout_for=lambda h: [transport.vector_spec(len(shards[h["shard"]]))],
        )
        received[shard] = message.arrays[0]
    np.testing.assert_array_equal(received, vector)


def test_push_of_a_leaf_shard_round_trips():
    header, arrays = sample_messages()["push_shard"]
    message = decode(to_wire(transport.encode(header, arrays)))
    assert [a.shape for a in message.arrays] == [s.shape for s in shard_specs(1)]
    assert len(LEAF_SHARDS[0]) != len(LEAF_SHARDS[1])
    wrong = to_wire(transport.encode({**header, "shard": 0}, arrays))
    with pytest.raises(ProtocolError) as caught:
        decode(wrong)
    assert caught.value.reason == "bad_frames"


def test_all_finite():
    leaves = leaves_of(example_tree())
    assert transport.all_finite(leaves)
    assert transport.all_finite([np.zeros(0, np.float32), np.arange(3)])
    for bad in (np.nan, np.inf, -np.inf):
        broken = [leaf.copy() for leaf in leaves]
        broken[1].flat[5] = bad
        assert not transport.all_finite(broken)


# --------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def exchange(
    server, client, request_header, request_arrays, reply_kind, reply_fields, reply_arrays
):
    """Client sends a request, server decodes and replies, client decodes the reply."""
    transport.send(client, transport.encode(request_header, request_arrays))
    assert server.poll(2000), "server got nothing"
    routing_id, frames = transport.recv(server)
    request = decode(frames)
    reply = transport.reply_header(
        request.header, reply_kind, version=6, fingerprint=FINGERPRINT, **reply_fields
    )
    transport.send(server, transport.encode(reply, reply_arrays), routing_id)
    assert client.poll(2000), "client got no reply"
    no_routing_id, reply_frames = transport.recv(client)
    assert no_routing_id is None
    return routing_id, request, decode_reply(reply_frames)


def test_every_kind_over_inproc_sockets(context):
    server, endpoint = transport.make_server_socket(context, "inproc://ps-test", MAX_BYTES)
    client = transport.make_client_socket(context, endpoint, b"worker-3", MAX_BYTES)
    samples = sample_messages()
    requests = ["hello", "pull", "push", "push_shard", "stats", "stop", "pull"]
    replies = ["welcome", "params", "ack", "error", "stats_reply", "ack", "not_modified"]
    try:
        for request_name, reply_name in zip(requests, replies, strict=True):
            request_header, request_arrays = samples[request_name]
            reply_header, reply_arrays = samples[reply_name]
            reply_fields = {
                key: value
                for key, value in reply_header.items()
                if key
                not in transport.make_header(
                    "x", token="", worker=0, seq=0, version=0, fingerprint=""
                )
            }
            routing_id, request, reply = exchange(
                server,
                client,
                request_header,
                request_arrays,
                reply_header["kind"],
                reply_fields,
                reply_arrays,
            )
            assert routing_id == b"worker-3"
            assert_same_message(request, request_header, request_arrays)
            assert reply.header["kind"] == reply_header["kind"]
            assert reply.header["seq"] == request_header["seq"]
            assert_same_message(reply, {**reply_header, "version": 6}, reply_arrays)
    finally:
        client.close()
        server.close()


def test_tcp_loopback_with_random_port(context):
    server, endpoint = transport.make_server_socket(context, "tcp://127.0.0.1:0", MAX_BYTES)
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    client = transport.make_client_socket(
        context, endpoint, b"worker-1", MAX_BYTES, receive_timeout_ms=2000
    )
    try:
        header, arrays = sample_messages()["push"]
        leaves = leaves_of(example_tree(np.random.default_rng(1)))
        routing_id, request, reply = exchange(server, client, header, arrays, "params", {}, leaves)
        assert routing_id == b"worker-1"
        assert_same_message(request, header, arrays)
        assert_same_message(reply, {"kind": "params", "version": 6}, leaves)
        with pytest.raises(zmq.Again):
            transport.recv(client)
    finally:
        client.close()
        server.close()


def test_socket_drops_peer_sending_over_max_message_size(context):
    limit = 1024
    server, endpoint = transport.make_server_socket(context, "tcp://127.0.0.1:0", limit)
    big_client = transport.make_client_socket(context, endpoint, b"big", limit)
    try:
        hello = transport.encode(header_for("hello"))
        transport.send(big_client, [hello[0], b"\0" * (4 * limit)])
        assert not server.poll(500), "an over-limit message reached the server"

        small_client = transport.make_client_socket(context, endpoint, b"small", limit)
        try:
            transport.send(small_client, hello)
            assert server.poll(2000), "a well-formed message after the drop did not arrive"
            routing_id, frames = transport.recv(server)
            assert routing_id == b"small"
            assert decode(frames, max_bytes=limit).header["kind"] == "hello"
        finally:
            small_client.close()
    finally:
        big_client.close()
        server.close()


def test_client_identity_is_checked(context):
    with pytest.raises(ValueError):
        transport.make_client_socket(context, "inproc://x", b"", MAX_BYTES)
    with pytest.raises(ValueError):
        transport.make_client_socket(context, "inproc://x", b"\0abc", MAX_BYTES)


class CountingSocket(zmq.Socket):
    """A socket that counts the zero-copy frames its `recv` returned that are still alive."""

    live = 0
    peak = 0

    def recv(self, flags=0, copy=True, track=False):
        part = super().recv(flags, copy=copy, track=track)
        if not copy:
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(part, self._gone)
        return part

    def _gone(self):
        self.live -= 1


@pytest.mark.parametrize(
    ("limits", "held"),
    [({"max_frames": 2}, 3), ({"max_bytes": 3 * 16 * 1024}, 4)],
)
def test_recv_lets_go_of_a_message_over_its_bound_frame_by_frame(context, limits, held):
    """64 frames of 16 KiB, each under MAXMSGSIZE: recv never holds more than its bound (plus
    the frame in hand), drains the message and says who sent it; the next one is intact."""
    server = context.socket(zmq.ROUTER, socket_class=CountingSocket)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = transport.make_client_socket(context, f"tcp://127.0.0.1:{port}", b"many", MAX_BYTES)
    try:
        client.send_multipart([b"h", *[bytes(16 * 1024)] * 63], copy=True)
        client.send_multipart([b"next", b"x"], copy=True)
        assert server.poll(2000)
        with pytest.raises(transport.OversizedMessage) as caught:
            transport.recv(server, **limits)
        assert caught.value.reason == "oversized" and caught.value.routing_id == b"many"
        assert server.peak <= held < 64
        assert server.live == 0
        routing_id, frames = transport.recv(server, max_frames=2, max_bytes=MAX_BYTES)
        assert routing_id == b"many" and [bytes(f.buffer) for f in frames] == [b"next", b"x"]
    finally:
        client.close()
        server.close()


def test_curve_admits_only_the_given_client_keys(context):
    """Encrypted sockets: the allowed client talks; a client with another key pair, or a
    plain one, never gets a message in; a client pinned to another server key gets no
    connection."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    authenticator = transport.start_curve_authenticator(context, {client_public})
    curve = transport.ServerCurve(server_public, server_secret)
    server, endpoint = transport.make_server_socket(
        context, "tcp://127.0.0.1:0", MAX_BYTES, curve=curve
    )
    allowed = transport.ClientCurve(client_public, client_secret, server_public)
    stranger = transport.ClientCurve(*zmq.curve_keypair(), server_public)
    impostor_server = transport.ClientCurve(client_public, client_secret, zmq.curve_keypair()[0])
    clients = [
        transport.make_client_socket(context, endpoint, None, MAX_BYTES, curve=keys)
        for keys in (stranger, impostor_server, None)
    ]
    good = transport.make_client_socket(context, endpoint, None, MAX_BYTES, curve=allowed)
    try:
        hello = transport.encode(header_for("hello"))
        for client in clients:
            transport.send(client, hello)
        assert not server.poll(1000), "a client without an admitted key got a message in"
        header, arrays = sample_messages()["push"]
        _, request, reply = exchange(server, good, header, arrays, "ack", _ACK, [])
        assert_same_message(request, header, arrays)
        assert reply.header["kind"] == "ack"
        assert not server.poll(200)  # still nothing from the others
    finally:
        for client in (*clients, good):
            client.close()
        server.close()
        authenticator.stop()


_ACK = {"accepted": True, "reason": None}
