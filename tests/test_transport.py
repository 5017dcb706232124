"""Tests for gorila_jax.wire.transport: encoding, validation, credentials as the codec sees
them, fingerprints, gradient parts and sockets (protocol 3)."""

import random
import weakref

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import zmq
from jax.flatten_util import ravel_pytree

from gorila_jax.core.gradient_parts import part_indices
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority
from gorila_jax.wire.transport import ProtocolError

SECRET = credentials.new_run_secret()
NUM_WORKERS = 4
AUTHORITY = WorkerAuthority(NUM_WORKERS, secret=SECRET)
WORKER = 3  # the worker every sample request comes from
MAX_BYTES = 1 << 20


def credential_of(worker: int, secret: str = SECRET) -> str:
    return credentials.worker_credential(secret, worker)


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


def float_tree(rng: np.random.Generator | None = None) -> dict:
    """The float32 leaves of ``example_tree``: what a Q-network's params are."""
    tree = example_tree(rng)
    del tree["steps"]
    return tree


def flat(tree) -> np.ndarray:
    """``tree`` as the one float32 vector that travels (``ravel_pytree`` order)."""
    return np.asarray(ravel_pytree(tree)[0], dtype=np.float32)


def leaves_of(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as numpy arrays, in canonical order."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


FINGERPRINT = transport.tree_fingerprint(example_tree())
VECTOR = flat(float_tree())  # the params: 121 elements
# Each worker's gradient part ("default": a quarter each, the last one takes the rest), as
# both ends compute it from the config: the wire carries only the values.
PARTS = [part_indices(VECTOR.size, NUM_WORKERS, w, "default", seed=42) for w in range(NUM_WORKERS)]
assert len(PARTS[0]) != len(PARTS[WORKER])


def layout_for(header: dict) -> int | None:
    """The receiver-side layout callback used throughout the tests: the params in a
    welcome and a params reply, the sending worker's gradient part in a push."""
    if header["kind"] in ("params", "welcome"):
        return VECTOR.size
    if header["kind"] == "push":
        return len(PARTS[header["worker"]])
    return None


def header_for(kind: str, **fields) -> dict:
    """A request header (with its worker's credential) or a reply header (without one)."""
    common = {"worker": WORKER, "seq": 11, "version": 5, "fingerprint": FINGERPRINT}
    if kind in transport.REQUEST_KINDS:
        worker = fields.get("worker", WORKER)
        return transport.make_header(
            kind, **({"credential": credential_of(worker)} | common | fields)
        )
    return {"kind": kind, **(common | fields)}


# What the server's welcome says (ParameterServer._on_hello).
WELCOME_CONFIG = {
    "num_params": int(VECTOR.size),
    "server_shard": 0,
    "shard_layout": [0, int(VECTOR.size)],
    "num_workers": NUM_WORKERS,
    "part_size": len(PARTS[WORKER]),
    "frames": 0,
}


def part_of(worker: int, vector: np.ndarray = VECTOR) -> np.ndarray:
    return vector[PARTS[worker]]


def sample_messages() -> dict[str, tuple[dict, list[np.ndarray]]]:
    return {
        "hello": (header_for("hello"), []),
        "welcome": (header_for("welcome", config=WELCOME_CONFIG), [VECTOR]),
        "pull": (header_for("pull", version=transport.NO_VERSION), []),
        "params": (header_for("params"), [VECTOR]),
        "not_modified": (header_for("not_modified"), []),
        "push": (header_for("push", mean_abs_td=0.25, frames=1234), [part_of(WORKER)]),
        "push_of_worker_0": (
            header_for("push", worker=0, mean_abs_td=1.5, frames=99),
            [part_of(0)],
        ),
        "ack": (header_for("ack", accepted=False, reason="stale"), []),
        "error": (header_for("error", reason="bad_frames", message="vector short"), []),
        "stop": (header_for("stop"), []),
        "join": (header_for("join", worker=0, credential=credentials.join_credential(SECRET)), []),
        "joined": (header_for("joined", assigned=3, frame_budget=5000, launched=2), []),
    }


def decode(frames, **overrides):
    """Decode a request as the server does."""
    options = {
        "authenticate": AUTHORITY.check,
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
        assert got.shape == sent.shape and got.dtype == np.float32
        assert got.tobytes() == np.ascontiguousarray(sent, dtype="<f4").tobytes()


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


def test_protocol_version_is_4():
    assert transport.PROTOCOL_VERSION == 4
    assert set(transport.REQUEST_KINDS) == {"hello", "pull", "push", "stop", "join"}
    assert set(transport.REPLY_KINDS) == {
        "welcome", "params", "not_modified", "ack", "error", "joined"
    }  # fmt: skip
    assert transport.ANSWERS["join"] == {"joined"}
    assert {"bad_credential", "bad_worker", "full", "no_join"} <= transport.REASONS
    assert not {"bad_token", "bad_shard"} & transport.REASONS


@pytest.mark.parametrize("name", sorted(sample_messages()))
def test_round_trip_every_kind(name):
    header, arrays = sample_messages()[name]
    message = decode_any(to_wire(transport.encode(header, arrays)), header["kind"])
    assert_same_message(message, header, arrays)
    assert ("credential" in message.header) == (header["kind"] in transport.REQUEST_KINDS)
    assert all(not array.flags.writeable for array in message.arrays)


def test_every_kind_is_sampled():
    assert {header["kind"] for header, _ in sample_messages().values()} == transport.KINDS


def test_mean_abs_td_decodes_as_a_float():
    """msgpack carries a whole number as an int: the server's filter gets a float."""
    header = header_for("push", mean_abs_td=2, frames=0)
    message = decode(to_wire(transport.encode(header, [part_of(WORKER)])))
    assert type(message.header["mean_abs_td"]) is float and message.header["mean_abs_td"] == 2.0


def test_encode_does_not_copy_contiguous_little_endian_vectors():
    vector = np.arange(12, dtype="<f4")
    frames = transport.encode(header_for("params"), [vector])
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), vector)


@pytest.mark.parametrize(
    "sent",
    [
        VECTOR.astype(">f4"),  # byte-swapped float32: converted
        np.repeat(VECTOR, 2)[::2],  # strided: copied
        np.repeat(VECTOR, 2).astype(">f4")[::2],
    ],
    ids=["big_endian", "strided", "big_endian_strided"],
)
def test_encode_converts_byte_swapped_and_non_contiguous_vectors(sent):
    np.testing.assert_array_equal(sent, VECTOR)
    message = decode_reply(to_wire(transport.encode(header_for("params"), [sent])))
    np.testing.assert_array_equal(message.arrays[0], VECTOR)
    assert message.arrays[0].tobytes() == VECTOR.astype("<f4").tobytes()


@pytest.mark.parametrize(
    "array",
    [
        VECTOR.reshape(11, 11),  # float32, but not 1-D
        np.float32(1.0),
        np.zeros((), np.float32),
        VECTOR.astype(np.float64),
        VECTOR.astype(np.float16),
        VECTOR.astype(np.int32),  # 4 bytes an element, but not a float
        VECTOR.astype(np.uint32),
        VECTOR.astype(np.complex64),
        np.zeros(3, dtype=[("a", "<f4")]),
        np.array([object()]),
        np.zeros(3, bool),
        [1.0, 2.0],  # a list is float64
        jnp.zeros(3, jnp.bfloat16),
    ],
    ids=lambda a: type(a).__name__ + str(getattr(a, "dtype", "")) + str(np.shape(a)),
)
def test_encode_carries_only_1d_float32_vectors(array):
    with pytest.raises(ValueError, match="1-D float32"):
        transport.encode(header_for("params"), [array])


def test_jax_arrays_encode_like_numpy():
    frames_np = to_wire(transport.encode(header_for("params"), [VECTOR]))
    frames_jax = to_wire(transport.encode(header_for("params"), [jnp.asarray(VECTOR)]))
    assert frames_np == frames_jax


def test_decoded_vector_rebuilds_the_tree():
    tree = float_tree()
    vector, unravel = ravel_pytree(tree)
    message = decode_reply(to_wire(transport.encode(header_for("params"), [vector])))
    rebuilt = unravel(jnp.asarray(message.arrays[0]))
    assert jax.tree.structure(rebuilt) == jax.tree.structure(tree)
    for got, sent in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(got, sent)


def test_reply_header_echoes_request_but_never_a_credential():
    request = header_for("pull")
    reply = transport.reply_header(request, "not_modified", version=9, fingerprint="f")
    assert (reply["worker"], reply["seq"], reply["version"]) == (3, 11, 9)
    assert "credential" not in reply and request["credential"] not in str(reply)
    fallback = transport.reply_header(
        {"credential": 5, "seq": -2}, "error", version=0, fingerprint="f", reason="malformed",
        message="",
    )  # fmt: skip
    assert (fallback["worker"], fallback["seq"]) == (0, 0) and "credential" not in fallback
    transport.encode(fallback)


def test_requests_and_replies_are_not_interchangeable():
    # A reply carrying a credential, or without one where a request is expected, is malformed.
    with pytest.raises(ProtocolError, match="unknown fields") as caught:
        decode_reply([packed({**_hello_dict(), "kind": "not_modified"})])
    assert caught.value.reason == "malformed"
    with pytest.raises(ProtocolError, match="not a reply"):
        decode_reply(to_wire(transport.encode(header_for("pull"))))
    with pytest.raises(ProtocolError, match="credential") as caught:
        decode(to_wire(transport.encode(header_for("not_modified"))))
    assert caught.value.reason == "malformed" and not caught.value.authenticated
    with pytest.raises(ProtocolError, match="not a request") as caught:
        decode([packed({**_hello_dict(), "kind": "not_modified"})])
    assert caught.value.authenticated  # the credential was right: the sender is the worker


def test_only_errors_after_the_credential_check_are_authenticated():
    wrong_credential = header_frame_with(_set("credential", "0" * 64))
    another_workers = header_frame_with(_set("credential", credential_of(0)))
    no_such_worker = header_frame_with(_set("worker", NUM_WORKERS))
    wrong_fingerprint = header_frame_with(_set("fingerprint", "x"))
    refusals = {}
    for name, frames in [
        ("wrong_credential", wrong_credential),
        ("another_workers", another_workers),
        ("no_such_worker", no_such_worker),
        ("wrong_fingerprint", wrong_fingerprint),
    ]:
        with pytest.raises(ProtocolError) as caught:
            decode(frames)
        refusals[name] = (caught.value.reason, caught.value.authenticated)
    assert refusals == {
        "wrong_credential": ("bad_credential", False),
        "another_workers": ("bad_credential", False),
        "no_such_worker": ("bad_worker", False),
        "wrong_fingerprint": ("bad_fingerprint", True),
    }


def test_each_worker_is_authenticated_by_its_own_credential_only():
    """A credential acts for its worker and no other: with worker w's credential a request
    in worker v's name is refused, for every pair."""
    for worker in range(NUM_WORKERS):
        for holder in range(NUM_WORKERS):
            header = header_for("stop", worker=worker, credential=credential_of(holder))
            frames = to_wire(transport.encode(header))
            if holder == worker:
                assert decode(frames).header["worker"] == worker
            else:
                with pytest.raises(ProtocolError) as caught:
                    decode(frames)
                assert caught.value.reason == "bad_credential"
    # The run secret itself, or a credential of another run, is no credential.
    for credential in (SECRET, credential_of(WORKER, credentials.new_run_secret())):
        with pytest.raises(ProtocolError) as caught:
            decode(header_frame_with(_set("credential", credential)))
        assert caught.value.reason == "bad_credential"


def test_authentication_comes_after_the_protocol_and_before_the_schema():
    """decode hands `authenticate` the unchecked header once the size and protocol checks
    pass, and before the schema: a sender without the credential learns nothing about the
    schema (its malformed header is bad_credential), one with it gets the schema's error,
    authenticated. An error `authenticate` raises comes out as it is."""
    seen = []

    def authenticate(header):
        seen.append(dict(header))
        AUTHORITY.check(header)

    bad_protocol = header_frame_with(_set("protocol", 2))
    with pytest.raises(ProtocolError, match="bad_protocol"):
        decode(bad_protocol, authenticate=authenticate)
    with pytest.raises(ProtocolError, match="oversized"):
        decode(header_frame_with(_set("pad", "x" * 100)), authenticate=authenticate, max_bytes=50)
    assert seen == []

    def extra_field(header):
        header["surprise"] = 1

    def extra_field_wrong_credential(header):
        extra_field(header)
        header["credential"] = "0" * 64

    with pytest.raises(ProtocolError) as caught:
        decode(header_frame_with(extra_field_wrong_credential), authenticate=authenticate)
    assert (caught.value.reason, caught.value.authenticated) == ("bad_credential", False)
    assert seen[-1]["surprise"] == 1  # the unchecked header
    with pytest.raises(ProtocolError) as caught:
        decode(header_frame_with(extra_field), authenticate=authenticate)
    assert (caught.value.reason, caught.value.authenticated) == ("malformed", True)

    def refuse(header):
        raise ProtocolError("bad_worker", "not today", header)

    with pytest.raises(ProtocolError) as caught:
        decode(to_wire(transport.encode(header_for("hello"))), authenticate=refuse)
    assert (caught.value.reason, caught.value.message) == ("bad_worker", "not today")
    assert not caught.value.authenticated


def test_a_refusal_from_layout_for_is_authenticated_in_a_request_only():
    """`layout_for` runs on a valid header: a ProtocolError it raises is the sender's own
    in a request (authenticated), never in a reply."""

    def refuse(header):
        raise ProtocolError("bad_frames", "no such part", header)

    header, arrays = sample_messages()["push"]
    with pytest.raises(ProtocolError) as caught:
        decode(to_wire(transport.encode(header, arrays)), layout_for=refuse)
    assert (caught.value.reason, caught.value.authenticated) == ("bad_frames", True)
    header, arrays = sample_messages()["params"]
    with pytest.raises(ProtocolError) as caught:
        decode_reply(to_wire(transport.encode(header, arrays)), layout_for=refuse)
    assert (caught.value.reason, caught.value.authenticated) == ("bad_frames", False)


def test_new_run_secret_and_worker_credentials():
    secret = credentials.new_run_secret()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert secret != credentials.new_run_secret()
    credential = credentials.worker_credential(secret, 0)
    assert len(credential) == 64 and int(credential, 16) >= 0
    assert credential == credentials.worker_credential(secret, 0)  # both ends derive it
    assert credential not in (secret, credentials.worker_credential(secret, 1))
    assert credential != credentials.worker_credential(credentials.new_run_secret(), 0)


# --------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------


def valid_push_frames() -> list[bytes]:
    header, arrays = sample_messages()["push"]
    return to_wire(transport.encode(header, arrays))


def packed(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def header_frame_with(change, kind: str = "hello") -> list[bytes]:
    """A valid request of `kind` (hello: no vector) whose decoded header is passed through
    ``change`` and repacked."""
    header, arrays = {
        "hello": (header_for("hello"), []),
        "push": sample_messages()["push"],
    }[kind]
    frames = to_wire(transport.encode(header, arrays))
    decoded = msgpack.unpackb(frames[0])
    change(decoded)
    return [packed(decoded), *frames[1:]]


def _without(name):
    return lambda header: header.pop(name)


def _set(name, value):
    return lambda header: header.__setitem__(name, value)


def _rename(old, new):
    return lambda header: header.__setitem__(new, header.pop(old))


def _push_with(change):
    return lambda: header_frame_with(change, kind="push")


REJECTIONS = {
    "wrong_credential": ("bad_credential", lambda: header_frame_with(_set("credential", "0" * 64))),
    "non_ascii_credential": (
        "bad_credential",
        lambda: header_frame_with(_set("credential", "é" * 64)),
    ),
    "empty_credential": ("bad_credential", lambda: header_frame_with(_set("credential", ""))),
    "another_workers_credential": (
        "bad_credential",
        lambda: header_frame_with(_set("credential", credential_of(0))),
    ),
    "the_run_secret_as_credential": (
        "bad_credential",
        lambda: header_frame_with(_set("credential", SECRET)),
    ),
    "worker_out_of_range": ("bad_worker", lambda: header_frame_with(_set("worker", NUM_WORKERS))),
    "worker_far_out_of_range": ("bad_worker", lambda: header_frame_with(_set("worker", 2**64 - 1))),
    "worker_out_of_range_wrong_credential": (
        "bad_worker",
        lambda: header_frame_with(lambda h: h.update(worker=NUM_WORKERS, credential="x")),
    ),
    "wrong_fingerprint": ("bad_fingerprint", lambda: header_frame_with(_set("fingerprint", "x"))),
    "truncated_frames": ("bad_frames", lambda: valid_push_frames()[:-1]),
    "extra_frames": ("bad_frames", lambda: [*valid_push_frames(), b"\0" * 16]),
    "short_frame": ("bad_frames", lambda: _replace_frame(1, lambda f: f[:-4])),
    "long_frame": ("bad_frames", lambda: _replace_frame(1, lambda f: f + b"\0" * 4)),
    "frame_not_whole_floats": ("bad_frames", lambda: _replace_frame(1, lambda f: f[:-1])),
    "float64_frame": (
        "bad_frames",
        lambda: _replace_frame(1, lambda f: np.frombuffer(f, "<f4").astype("<f8").tobytes()),
    ),
    "another_workers_part_size": (
        "bad_frames",
        lambda: to_wire(
            transport.encode(header_for("push", mean_abs_td=0.0, frames=0), [part_of(0)])
        ),
    ),
    "whole_vector_for_a_part": (
        "bad_frames",
        lambda: to_wire(transport.encode(header_for("push", mean_abs_td=0.0, frames=0), [VECTOR])),
    ),
    "two_vectors": (  # built by hand: encode refuses to make one (see below)
        "bad_frames",
        lambda: to_wire(
            [
                msgpack.packb(
                    {
                        **header_for("push", mean_abs_td=0.0, frames=0),
                        "protocol": transport.PROTOCOL_VERSION,
                        "arrays": 2,
                    }
                ),
                part_of(WORKER).tobytes(),
                part_of(WORKER).tobytes(),
            ]
        ),
    ),
    "vector_where_none_expected": (
        "bad_frames",
        lambda: to_wire(transport.encode(header_for("hello"), [np.zeros(3, np.float32)])),
    ),
    "vector_in_a_pull": (
        "bad_frames",
        lambda: to_wire(transport.encode(header_for("pull"), [VECTOR])),
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
    "bool_worker": ("malformed", lambda: header_frame_with(_set("worker", True))),
    "negative_worker": ("bad_worker", lambda: header_frame_with(_set("worker", -1))),
    "version_below_none": ("malformed", lambda: header_frame_with(_set("version", -2))),
    "credential_not_str": ("malformed", lambda: header_frame_with(_set("credential", b"abc"))),
    "credential_missing": ("malformed", lambda: header_frame_with(_without("credential"))),
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
    # Protocol 2's fields and kinds, in a protocol 3 header: malformed.
    "token_for_credential": (
        "malformed",
        lambda: header_frame_with(_rename("credential", "token")),
    ),
    "token_beside_credential": ("malformed", lambda: header_frame_with(_set("token", "t" * 64))),
    "loss_for_mean_abs_td": ("malformed", _push_with(_rename("mean_abs_td", "loss"))),
    "loss_beside_mean_abs_td": ("malformed", _push_with(_set("loss", 1.0))),
    "shard_field_none": ("malformed", _push_with(_set("shard", None))),
    "shard_field_int": ("malformed", _push_with(_set("shard", 0))),
    "stats_request": ("malformed", lambda: header_frame_with(_set("kind", "stats"))),
    "stats_reply": (
        "malformed",
        lambda: header_frame_with(lambda h: h.update(kind="stats_reply", stats={})),
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


def protocol_2_header(kind: str) -> dict:
    """A header as protocol 2 wrote it: the run token, a push's loss and shard, the
    stats request and reply."""
    header = {
        "kind": kind,
        "protocol": 2,
        "worker": WORKER,
        "seq": 11,
        "version": 5,
        "fingerprint": FINGERPRINT,
        "arrays": 0,
    }
    if kind in ("hello", "pull", "push", "stats", "stop"):
        header["token"] = "t" * 64
    if kind == "push":
        header |= {"loss": 0.5, "shard": None, "frames": 10, "arrays": 1}
    if kind == "welcome":
        header["config"] = {"num_params": 121, "shard": None, "shard_size": 121, "frames": 0}
    if kind == "stats_reply":
        header["stats"] = {"version": 5}
    return header


@pytest.mark.parametrize("kind", ["hello", "pull", "push", "stats", "stop"])
def test_a_protocol_2_request_is_refused_naming_both_versions(kind):
    """Whatever else is in it (a token, loss, shard, the stats kind), a protocol 2 request
    is refused for its version first, before authentication, with both versions named."""
    header = protocol_2_header(kind)
    frames = [packed(header)]
    if kind == "push":
        frames.append(part_of(WORKER).tobytes())
    with pytest.raises(ProtocolError) as caught:
        decode(frames)
    assert caught.value.reason == "bad_protocol" and not caught.value.authenticated
    assert caught.value.message == "protocol 2, expected 4"
    assert caught.value.header["worker"] == WORKER  # enough to address the error reply


@pytest.mark.parametrize("kind", ["welcome", "params", "ack", "stats_reply"])
def test_a_protocol_2_reply_is_refused_naming_both_versions(kind):
    frames = [packed(protocol_2_header(kind))]
    if kind in ("welcome", "params"):
        frames[0] = packed(protocol_2_header(kind) | {"arrays": 1})
        frames.append(VECTOR.tobytes())
    with pytest.raises(ProtocolError) as caught:
        decode_reply(frames)
    assert caught.value.reason == "bad_protocol"
    assert caught.value.message == "protocol 2, expected 4"


def test_wrong_field_type_for_kind_specific_fields():
    header = _hello_dict() | {"kind": "push", "mean_abs_td": "high", "frames": 0}
    with pytest.raises(ProtocolError, match="mean_abs_td") as caught:
        decode([packed(header)])
    assert caught.value.reason == "malformed" and caught.value.authenticated
    assert caught.value.header["kind"] == "push"
    for value in (None, [1.0], {"x": 1}, True):
        with pytest.raises(ProtocolError, match="mean_abs_td"):
            decode([packed(header | {"mean_abs_td": value})])
    with pytest.raises(ProtocolError, match="frames"):
        decode([packed(header | {"mean_abs_td": 1.0, "frames": -1})])


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
        transport.encode(header_for("push", mean_abs_td=0.1, frames=np.int64(3)))
    with pytest.raises(ProtocolError, match="missing"):
        transport.encode(header_for("push", mean_abs_td=0.1))
    with pytest.raises(ProtocolError, match="msgpack"):
        transport.encode(header_for("welcome", config={"rate": np.float32(1.0)}))
    with pytest.raises(ProtocolError) as caught:
        transport.encode(header_for("welcome", config={"pad": "x" * (1 << 17)}))
    assert caught.value.reason == "oversized"


@pytest.mark.parametrize(
    "header",
    [
        header_for("push", loss=0.1, frames=0),
        header_for("push", mean_abs_td=0.1, shard=None, frames=0),
        header_for("hello", token="t" * 64),
        header_for("stats"),
        header_for("stats_reply", stats={}),
    ],
    ids=["loss", "shard", "token", "stats", "stats_reply"],
)
def test_encode_refuses_protocol_2_fields_and_kinds(header):
    with pytest.raises(ProtocolError) as caught:
        transport.encode(header)
    assert caught.value.reason == "malformed"


def test_fuzzed_push_only_raises_protocol_error():
    rng = random.Random(1234)
    small = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    small_fingerprint = transport.tree_fingerprint(small)
    authority = WorkerAuthority(2, secret=SECRET)
    header = transport.make_header(
        "push",
        credential=credential_of(1),
        worker=1,
        seq=2,
        version=3,
        fingerprint=small_fingerprint,
        mean_abs_td=0.5,
        frames=10,
    )
    valid = to_wire(transport.encode(header, [flat(small)]))

    def small_layout_for(decoded):
        return flat(small).size if decoded["kind"] == "push" else None

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
                authenticate=authority.check,
                expected_fingerprint=small_fingerprint,
                layout_for=small_layout_for,
                max_bytes=4096,
            )
            accepted += 1
        except ProtocolError as error:
            assert error.reason in transport.REASONS, error
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
    assert {"malformed", "bad_frames", "bad_credential"} <= set(reasons), reasons
    assert sum(reasons.values()) > 1000, (reasons, accepted)


# --------------------------------------------------------------------------------------
# Fingerprints and gradient parts
# --------------------------------------------------------------------------------------


def test_fingerprint_stable_across_numpy_jax_and_shape_dtype_structs():
    tree = example_tree()
    jax_tree = jax.tree.map(jnp.asarray, tree)
    struct_tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    big_endian = jax.tree.map(lambda a: a.astype(a.dtype.newbyteorder(">")), tree)
    fingerprints = {
        transport.tree_fingerprint(t) for t in (tree, jax_tree, struct_tree, big_endian)
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


def test_gradient_parts_round_trip():
    """Pushes of gradient parts (``gorila_jax.core.gradient_parts``): each worker's a float32
    frame whose length the receiver takes from the worker (no field says it); together,
    the whole vector."""
    assert len({len(part) for part in PARTS}) > 1  # the last part takes the remainder
    received = np.full_like(VECTOR, np.nan)
    for worker, part in enumerate(PARTS):
        header = header_for("push", worker=worker, mean_abs_td=0.0, frames=0)
        message = decode(to_wire(transport.encode(header, [VECTOR[part]])))
        assert message.header["worker"] == worker
        received[part] = message.arrays[0]
    np.testing.assert_array_equal(received, VECTOR)


def test_a_push_of_another_workers_part_size_is_bad_frames():
    header, arrays = sample_messages()["push_of_worker_0"]
    message = decode(to_wire(transport.encode(header, arrays)))
    assert [a.shape for a in message.arrays] == [(len(PARTS[0]),)]
    wrong = header_for("push", worker=WORKER, mean_abs_td=1.5, frames=99)
    with pytest.raises(ProtocolError) as caught:
        decode(to_wire(transport.encode(wrong, arrays)))
    assert caught.value.reason == "bad_frames" and caught.value.authenticated


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
    requests = ["hello", "pull", "push", "push", "stop", "pull"]
    replies = ["welcome", "params", "ack", "error", "ack", "not_modified"]
    common = transport.make_header("x", credential="", worker=0, seq=0, version=0, fingerprint="")
    try:
        for request_name, reply_name in zip(requests, replies, strict=True):
            request_header, request_arrays = samples[request_name]
            reply_header, reply_arrays = samples[reply_name]
            reply_fields = {key: value for key, value in reply_header.items() if key not in common}
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
        params = [flat(float_tree(np.random.default_rng(1)))]
        routing_id, request, reply = exchange(server, client, header, arrays, "params", {}, params)
        assert routing_id == b"worker-1"
        assert_same_message(request, header, arrays)
        assert_same_message(reply, {"kind": "params", "version": 6}, params)
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


def test_a_curve_authenticator_starts_again_at_once_after_a_stop(context):
    """A context's one ZAP address is released in the background after `stop()`: a
    server restarted in the same process (as the tests do, one case after another) must
    not fail with "Address already in use". Without the bind retried, most of these
    starts failed here; each restarted handler must still admit only its own keys."""
    for round in range(30):
        key = f"key-{round}".encode()
        authenticator = transport.start_curve_authenticator(context, {key})
        try:
            admits = authenticator.credentials_providers[transport.ZAP_DOMAIN].callback
            assert admits(transport.ZAP_DOMAIN, key) and not admits(transport.ZAP_DOMAIN, b"x")
        finally:
            authenticator.stop()


_ACK = {"accepted": True, "reason": None}


def test_encode_makes_no_message_of_two_vectors():
    header = header_for("push", mean_abs_td=0.0, frames=0)
    with pytest.raises(ValueError, match="at most one vector"):
        transport.encode(header, [part_of(WORKER), part_of(WORKER)])
