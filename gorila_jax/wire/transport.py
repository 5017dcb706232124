"""Wire format between the parameter server (zmq ROUTER) and the bundles (zmq DEALER).

This module holds the codec (``encode``, ``decode`` for requests, ``decode_reply`` for
replies, with the header schema they enforce), ``tree_fingerprint`` and the few socket
calls both ends need. What the server does with a message is in
``gorila_jax.server.parameter_server``, what a bundle sends and expects in
``gorila_jax.bundle.client``; this docstring describes the protocol they speak.

Protocol
--------
``PROTOCOL_VERSION`` is 4 (protocol 3 had no ``join``; protocol 2 carried one run token
for every worker, a gradient part's index in each push and a ``stats`` request; protocol 1
replies carried the token).
Every header says its version and a message of another version is refused
("bad_protocol"; a bundle that gets that reply, or a reply of another version, stops with
one line naming both versions). Each request of a bundle gets exactly one reply, sent
back on the connection the request came from:

=======  ==========================  ===================================================
request  replies                     what the server does
=======  ==========================  ===================================================
hello    welcome                     registers the worker (again, after a restart: this
                                     also clears its ``stop``); sends its info and the
                                     params
pull     params or not_modified      params when the request's ``version`` differs from
                                     the server's, ``not_modified`` when it is the same
                                     (a bundle asks with ``NO_VERSION`` for params it
                                     must get, such as a target network refresh)
push     ack                         applies the gradient, or refuses it (ack with
                                     ``accepted`` false and the reason)
stop     ack                         records that this worker is done; the server's
                                     ``serve`` returns once every bundle has stopped
join     joined                      server shard 0 of a run started with room for more
                                     bundles (``--max-bundles``) hands a bundle started
                                     with ``--join`` a free worker index; the bundle
                                     then says hello to every shard as that worker
=======  ==========================  ===================================================

Any request can instead get an ``error`` reply, when it breaks the wire format or the
server refuses it before its handler runs (see the reason codes below); a request that
gets one is only counted in the statistics, it never changes the parameters.

Message layout
--------------
A message is a list of frames. Frame 0 is a msgpack-encoded header (a map with str keys,
at most ``MAX_HEADER_BYTES``). At most one frame follows: a 1-D float32 vector, its raw
little-endian bytes (the parameters, or the part of a gradient a worker pushes, flattened
in ``jax.flatten_util.ravel_pytree`` order). Its length never travels: the receiver passes
``decode`` / ``decode_reply`` a ``layout_for`` callback that gives, from the validated
header, the number of elements it expects (None: no vector), so a sender cannot make the
receiver allocate or interpret anything it did not expect.

Header fields carried by every message
--------------------------------------
============  =====  ===================================================================
field         type   meaning
============  =====  ===================================================================
kind          str    one of ``REQUEST_KINDS`` or ``REPLY_KINDS``
protocol      int    ``PROTOCOL_VERSION`` (``encode`` fills it)
credential    str    requests only: what proves the request comes from ``worker``
                     (``gorila_jax.wire.credentials``): with token security the
                     worker's own credential, derived from the run secret and its index,
                     so one bundle's credential cannot act for another; with CURVE
                     security the empty string (the connection's CURVE key names the
                     worker). A reply never carries one (``decode_reply`` refuses one
                     that does): a reply goes to the connection its request came from
worker        int    worker id, >= 0 (the server's ``authenticate`` refuses one that is not
                     below its number of workers, "bad_worker", before the schema is
                     checked, so a negative one is "bad_worker" too); a reply echoes the
                     request's
seq           int    per-worker sequence number, >= 0, strictly increasing over the
                     worker's whole life, restarts included: a bundle starts from the
                     wall clock in nanoseconds and the server refuses a number it has
                     seen, "replayed". A reply echoes the request's, so a bundle with
                     several requests in flight matches replies by it
version       int    parameter version, >= ``NO_VERSION`` (-1, "no parameters").
                     pull: the version the worker holds; push: the version the gradient
                     was computed on; replies: the server's version (updates applied)
fingerprint   str    ``tree_fingerprint`` of the Q-network's parameter tree; the server
                     checks it on every request, a bundle on every reply (checkpoints
                     record it too)
arrays        int    number of vector frames that follow, 0 or 1 (``encode`` fills it)
============  =====  ===================================================================

A reply to a request whose header could not be read echoes worker 0 and seq 0
(``reply_header``).

Kind-specific fields (all listed fields are required; no other field is accepted)
---------------------------------------------------------------------------------
============  ================  =========================================================
kind          field: type       meaning / vector frame
============  ================  =========================================================
hello         -                 worker -> server, first contact (and after a lost
                                connection); no vector
welcome       config: dict      server -> worker, the info dict ``ParameterServer.
                                _on_hello`` builds for that worker: ``num_params``
                                (elements of the parameter vector the server holds: its
                                slice when it is one of several server shards),
                                ``server_shard`` (which one, 0 when it is alone),
                                ``shard_layout`` (the slices' bounds, ``[0, N]`` alone),
                                ``num_workers``, ``part_size`` (elements of each of the
                                worker's pushes: its gradient part within this slice,
                                ``gorila_jax.core.gradient_parts``; both ends compute
                                which elements from the config) and ``frames``
                                (environment frames the server has recorded for it, so
                                a restarted bundle counts on);
                                vector: the parameters (``num_params``)
pull          -                 worker -> server; no vector
params        -                 server -> worker; vector: the parameters
not_modified  -                 server -> worker, the worker's version is current
push          mean_abs_td:      the mean absolute TD error of the batch the gradient
              float             comes from; the server's outlier filter refuses a push
                                whose value is far above those of recent pushes, and a
                                non-finite one as "non_finite"
              frames: int       environment frames the worker has done, >= 0
                                vector: the worker's gradient part (``part_size``)
ack           accepted: bool    whether the push was applied (a ``stop`` is always
                                acknowledged with true)
              reason: str|None  why not, a reason code (None when accepted)
error         reason: str       a reason code (see below)
              message: str      human-readable detail (the server cuts it short)
stop          -                 worker -> server: this worker is done (a bundle sends it
                                when it closes); no vector
join          -                 joining bundle -> server shard 0: its ``worker`` is 0
                                (it has none yet) and its credential the run's join
                                credential (``credentials.join_credential``); its
                                ``seq`` is checked against other joins, not worker 0's
joined        assigned: int     server -> joining bundle: its worker index (>= the
                                bundles started with the run); it derives that
                                worker's credential and says hello as it
              frame_budget: int  the frames it plays (a started bundle's share)
              launched: int     bundles started with the run (its epsilon schedule is
                                stretched as theirs is)
============  ================  =========================================================

Reason codes
------------
``ProtocolError.reason`` and the ``reason`` of error/ack replies are short str codes, all
in ``REASONS``. ``decode`` / ``decode_reply`` raise: "malformed" (header is not msgpack /
not a map / a field is missing, unknown or mistyped / unknown kind / a reply where a
request is expected or the reverse), "bad_protocol" (protocol version differs),
"bad_worker" and "bad_credential" (the receiver's ``authenticate`` callback: no such
worker, or a credential that is not that worker's), "bad_fingerprint", "bad_frames"
(vector frame count or byte length wrong), "oversized" (message over ``max_bytes`` or
header over ``MAX_HEADER_BYTES``; ``recv`` raises it too, for a message over its frame or
byte bound). The server answers "replayed" (a sequence number already seen) and
"future_seq" (a sequence number over the server's wall clock in ns plus an hour: bundles
number from the clock, and such a number would lock the worker out) in error replies
too; a push whose ``frames`` jumps further than a bundle could have gone since its last
report gets an ack with "implausible_frames". A join is refused "no_join" by a server
(or a shard other than 0) that takes no joining bundles and "full" when every worker index
the run has room for is in use.
A refused push gets an ack with "stale" (computed on parameters more than
``max_staleness`` versions old, or on a version the server has not made),
"non_finite" (a NaN or an infinity in the gradient or its ``mean_abs_td``), "over_norm"
(the gradient's norm is over the clip the bundle applies, ``max_grad_norm``, or its
square overflows float32), "outlier" (its ``mean_abs_td``) or "non_finite_update" (the
parameters or the optimizer state stopped being finite after the batch it was applied
in; the server then refuses every push and pull and stops, see
``gorila_jax.server.parameter_server``). ``ProtocolError.authenticated`` says whether the
request's credential had been verified before the error was found: only then may a
receiver count it against the worker the header names.

Sockets
-------
``make_server_socket`` / ``make_client_socket`` set ``zmq.MAXMSGSIZE`` so zmq itself
drops peers that send an over-large frame (libzmq checks each frame, not the sum; inproc
transports skip the check). ``message_limit`` sizes that limit from the model: the largest
legitimate message plus one header of headroom. The server's ROUTER does not let a peer
take over another's routing id (no ``ROUTER_HANDOVER``), and bundles let it assign their
routing ids, so no peer can have replies meant for another routed to itself.

zmq delivers a multipart message only once all of it has arrived, so one message of many
frames, each under ``MAXMSGSIZE``, is buffered whole inside zmq before anything can read
it; no socket option bounds that sum. ``recv`` bounds what this side holds: it receives
frame by frame, and past ``max_frames`` frames or ``max_bytes`` bytes it releases each
further frame as soon as it arrives and raises "oversized"; the server's small
``RCVHWM`` bounds how many whole messages zmq queues per peer. Only an authenticated
transport keeps a peer without the keys from sending anything at all: with
``ServerCurve`` / ``ClientCurve`` keys the sockets speak zmq CURVE (every frame encrypted
and authenticated; the client checks the server's public key, and the server's ZAP handler,
``start_curve_authenticator``, completes the handshake only for the client public keys it
was given), so a peer without one of those keys never gets a message in.

``send`` is zero-copy by default: the arrays behind the frames must not be changed until
zmq has sent them. ``recv`` returns zero-copy ``zmq.Frame`` objects, and the arrays
``decode`` returns are read-only views into them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

PROTOCOL_VERSION = 4
MAX_HEADER_BYTES = 64 * 1024
NO_VERSION = -1
SERVER_RECEIVE_QUEUE = 16  # whole messages zmq queues per peer on the server's socket
# Replies zmq holds per peer; more are dropped. A bundle has at most 5 requests out; zmq
# counts a queue lazily (in steps of half of it), so a turn's burst of replies needs room.
SERVER_SEND_QUEUE = 32

REQUEST_KINDS = frozenset({"hello", "pull", "push", "stop", "join"})
REPLY_KINDS = frozenset({"welcome", "params", "not_modified", "ack", "error", "joined"})
KINDS = REQUEST_KINDS | REPLY_KINDS
ANSWERS = {  # the replies each request may get, besides "error" (the table above)
    "hello": frozenset({"welcome"}),
    "pull": frozenset({"params", "not_modified"}),
    "push": frozenset({"ack"}),
    "stop": frozenset({"ack"}),
    "join": frozenset({"joined"}),
}
assert set(ANSWERS) == REQUEST_KINDS

REASONS = frozenset(
    {
        "malformed",
        "bad_protocol",
        "bad_credential",
        "bad_fingerprint",
        "bad_frames",
        "oversized",
        "bad_worker",
        "replayed",
        "future_seq",
        "stale",
        "non_finite",
        "over_norm",
        "implausible_frames",
        "outlier",
        "non_finite_update",
        "no_join",
        "full",
    }
)

FLOAT32 = np.dtype("<f4")

_MSGPACK_LIMITS = {
    "max_str_len": MAX_HEADER_BYTES,
    "max_bin_len": MAX_HEADER_BYTES,
    "max_array_len": 4096,
    "max_map_len": 1024,
    "max_ext_len": 0,
}


class ProtocolError(ValueError):
    """A message that breaks the wire format.

    ``reason`` is a short code (see ``REASONS``), ``message`` a readable detail and
    ``header`` the decoded header when decoding got that far (use it only to address an
    error reply, see ``reply_header``). ``authenticated``: the header's credential was
    checked and is its ``worker``'s, so that worker sent it; otherwise nothing in it is
    trustworthy.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        header: dict | None = None,
        *,
        authenticated: bool = False,
    ):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.header = header
        self.authenticated = authenticated


# --------------------------------------------------------------------------------------
# Tree fingerprints
# --------------------------------------------------------------------------------------


def _leaf_description(leaf: Any) -> tuple[list[int], str]:
    """A leaf's shape and dtype name (numpy and jax arrays, ``jax.ShapeDtypeStruct``)."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = np.asarray(leaf)
    return [int(d) for d in leaf.shape], np.dtype(leaf.dtype).name


def _fingerprint(paths: Sequence[str], leaves: Sequence[Any]) -> str:
    description = [
        [path, *_leaf_description(leaf)] for path, leaf in zip(paths, leaves, strict=True)
    ]
    text = json.dumps(description, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def tree_fingerprint(tree: Any) -> str:
    """Hash of a pytree's leaf paths, shapes and dtypes (not values, not byte order).

    Leaves are arrays (numpy or jax) or ``jax.ShapeDtypeStruct``; numpy and jax leaves of
    the same shape and dtype give the same fingerprint. Both ends of the wire compute it
    from their own copy of the model, and checkpoints record it: the string must not change.
    """
    import jax  # here only: a bundle's client and the wire need no JAX otherwise

    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in with_paths]
    return _fingerprint(paths, [leaf for _, leaf in with_paths])


# --------------------------------------------------------------------------------------
# Header schema
# --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    # msgpack decodes integers as exactly int: the common case costs one type() call.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _version_int(value: Any) -> bool:
    return _is_int(value) and value >= NO_VERSION


def _number(value: Any) -> bool:
    return isinstance(value, float) or _is_int(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


_COMMON_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (_is_str, "str"),
    "protocol": (_is_int, "int"),
    "worker": (_non_negative_int, "int >= 0"),
    "seq": (_non_negative_int, "int >= 0"),
    "version": (_version_int, f"int >= {NO_VERSION}"),
    "fingerprint": (_is_str, "str"),
    "arrays": (_non_negative_int, "int >= 0"),
}

_KIND_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "hello": {},
    "welcome": {"config": (_is_dict, "dict")},
    "pull": {},
    "params": {},
    "not_modified": {},
    "push": {
        "mean_abs_td": (_number, "float"),
        "frames": (_non_negative_int, "int >= 0"),
    },
    "ack": {"accepted": (_is_bool, "bool"), "reason": (_optional_str, "str or None")},
    "error": {"reason": (_is_str, "str"), "message": (_is_str, "str")},
    "stop": {},
    "join": {},
    "joined": {
        "assigned": (_non_negative_int, "int >= 0"),
        "frame_budget": (_non_negative_int, "int >= 0"),
        "launched": (_non_negative_int, "int >= 0"),
    },
}
assert set(_KIND_FIELDS) == KINDS
_REQUEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {"credential": (_is_str, "str")}
# Every kind's whole schema, merged once: (fields in order, their names as a frozenset).
_SCHEMAS = {
    kind: (
        fields := tuple(
            ({**_COMMON_FIELDS, **_KIND_FIELDS[kind]}
             | (_REQUEST_FIELDS if kind in REQUEST_KINDS else {})).items()
        ),
        frozenset(name for name, _ in fields),
    )
    for kind in KINDS
}  # fmt: skip


def _check_protocol(header: dict) -> None:
    protocol = header.get("protocol")
    if not _is_int(protocol):
        raise ProtocolError("malformed", "field 'protocol' missing or not an int", header)
    if protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_protocol", f"protocol {protocol}, expected {PROTOCOL_VERSION}", header
        )


def _validate_header(header: dict, *, authenticated: bool = False) -> None:
    """Check field names and types (not credential or fingerprint values); requests carry
    a credential, replies none."""

    def refuse(message: str) -> ProtocolError:
        return ProtocolError("malformed", message, header, authenticated=authenticated)

    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in _SCHEMAS:  # (a map is not hashable)
        for key in header:
            if not isinstance(key, str):
                raise refuse(f"header key {key!r} is not a str")
        raise refuse(f"unknown kind {kind!r}")
    fields, names = _SCHEMAS[kind]
    for name, (is_valid, expected) in fields:
        if name not in header:
            raise refuse(f"{kind}: field {name!r} missing")
        if not is_valid(header[name]):
            raise refuse(f"{kind}: field {name!r} must be {expected}")
    if len(header) != len(names):  # str keys checked: every name of the schema is present
        for key in header:
            if not isinstance(key, str):
                raise refuse(f"header key {key!r} is not a str")
        raise refuse(f"{kind}: unknown fields {sorted(set(header) - names)}")


def make_header(
    kind: str, *, credential: str, worker: int, seq: int, version: int, fingerprint: str, **fields
) -> dict:
    """A request header for ``encode`` (which adds ``protocol`` and ``arrays``)."""
    return {
        "kind": kind,
        "credential": credential,
        "worker": worker,
        "seq": seq,
        "version": version,
        "fingerprint": fingerprint,
        **fields,
    }


def reply_header(
    request: Mapping | None, kind: str, *, version: int, fingerprint: str, **fields
) -> dict:
    """A reply header echoing ``worker`` and ``seq`` of ``request`` (never a credential).

    ``request`` may be a partial header (``ProtocolError.header``) or None; fields it
    lacks or has mistyped become 0 / 0.
    """
    request = request if isinstance(request, Mapping) else {}
    worker = request.get("worker")
    seq = request.get("seq")
    return {
        "kind": kind,
        "worker": worker if _non_negative_int(worker) else 0,
        "seq": seq if _non_negative_int(seq) else 0,
        "version": version,
        "fingerprint": fingerprint,
        **fields,
    }


# --------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------


class Message(NamedTuple):
    """A validated message: its header and its vectors (read-only views; 0 or 1)."""

    header: dict
    arrays: list[np.ndarray]


def _vector_frame(array: Any) -> memoryview:
    """The little-endian bytes of a 1-D float32 vector (copied only when it is not
    contiguous little-endian float32 already)."""
    array = np.asarray(array)
    if array.ndim != 1 or array.dtype.kind != "f" or array.dtype.itemsize != 4:
        raise ValueError(f"the wire carries 1-D float32 vectors, not {array.dtype}{array.shape}")
    return memoryview(np.ascontiguousarray(array, dtype=FLOAT32).view(np.uint8))


def encode(
    header: Mapping, arrays: Sequence[Any] = (), *, validate: bool = True
) -> list[bytes | memoryview]:
    """Frames of a message: the packed header, then the vector if there is one.

    Fills ``protocol`` and ``arrays``, validates the header (``ProtocolError`` on a bad
    one; ``validate=False`` skips that for a header the caller built from checked values,
    the server's acks on its hot path) and does not copy a vector that is already
    contiguous little-endian float32 (ValueError for anything but a 1-D float32 vector).
    """
    if len(arrays) > 1:
        raise ValueError(f"a message carries at most one vector, not {len(arrays)}")
    header = dict(header)
    header["protocol"] = PROTOCOL_VERSION
    header["arrays"] = len(arrays)
    if validate:
        _validate_header(header)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise ProtocolError("malformed", f"header not msgpack-able: {error}", header) from None
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(packed)} bytes", header)
    return [packed, *(_vector_frame(array) for array in arrays)]


def _as_byte_view(frame: Any) -> memoryview:
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} not allowed")


def _unpack_header(view: memoryview) -> dict:
    try:
        header = msgpack.unpackb(
            view, raw=False, strict_map_key=True, ext_hook=_refuse_ext, **_MSGPACK_LIMITS
        )
    except Exception as error:  # msgpack raises many types for bad input
        # The error's type only: its text can quote the header, credential included, and
        # an error reply must never carry one back.
        raise ProtocolError(
            "malformed", f"header is not msgpack ({type(error).__name__})"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"header is a {type(header).__name__}, not a map")
    return header


def _open(frames: Sequence[Any], max_bytes: int) -> tuple[list[memoryview], dict]:
    """Byte views of the frames and the unpacked header, after the size checks."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    views = [_as_byte_view(frame) for frame in frames]
    total = sum(view.nbytes for view in views)
    if total > max_bytes:
        raise ProtocolError("oversized", f"message of {total} bytes exceeds {max_bytes}")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {views[0].nbytes} bytes")
    header = _unpack_header(views[0])
    _check_protocol(header)
    return views, header


def _check_vector(
    header: dict,
    array_views: list[memoryview],
    *,
    expected_fingerprint: str | None,
    layout_for: Callable[[dict], int | None],
    authenticated: bool,
) -> Message:
    """Fingerprint, frame count and vector length of a validated header; the message."""

    def refuse(reason: str, message: str) -> ProtocolError:
        return ProtocolError(reason, message, header, authenticated=authenticated)

    if expected_fingerprint is not None and header["fingerprint"] != expected_fingerprint:
        raise refuse(
            "bad_fingerprint",
            f"fingerprint {header['fingerprint']!r}, expected {expected_fingerprint!r}",
        )
    if header["arrays"] != len(array_views):
        raise refuse("bad_frames", f"header says {header['arrays']} arrays, got {len(array_views)}")
    try:
        length = layout_for(header)
    except ProtocolError as error:
        error.authenticated = authenticated
        raise
    expected = 0 if length is None else 1
    if len(array_views) != expected:
        raise refuse(
            "bad_frames", f"{header['kind']}: expected {expected} vectors, got {len(array_views)}"
        )
    arrays = []
    if array_views:
        (view,) = array_views
        if view.nbytes != 4 * length:
            raise refuse("bad_frames", f"vector of {view.nbytes} bytes, expected {4 * length}")
        array = np.frombuffer(view, dtype=FLOAT32)
        array.flags.writeable = False
        arrays.append(array)
    if "mean_abs_td" in header:
        header["mean_abs_td"] = float(header["mean_abs_td"])
    return Message(header, arrays)


def decode(
    frames: Sequence[Any],
    *,
    authenticate: Callable[[dict], None],
    expected_fingerprint: str | None,
    layout_for: Callable[[dict], int | None],
    max_bytes: int,
) -> Message:
    """Validate and decode a request (the server's side), or raise ``ProtocolError``.

    ``frames``: bytes, memoryviews or ``zmq.Frame`` (no routing id). Checks, in order:
    total size <= ``max_bytes`` and header size; header is a msgpack map; protocol;
    ``authenticate(header)``, given the unchecked header, which raises ``ProtocolError``
    ("bad_worker", "bad_credential") unless the header's credential is its worker's
    (``gorila_jax.wire.credentials``); field names and types, the kind a request;
    fingerprint (skipped when ``expected_fingerprint`` is None); vector frame count; then
    ``layout_for(header)`` (called only on a valid header) gives the vector's length, or
    None for none. Errors raised after the credential check are ``authenticated``. The
    vector is a zero-copy, read-only view of its frame.
    """
    views, header = _open(frames, max_bytes)
    authenticate(header)
    if isinstance(header.get("kind"), str) and header["kind"] in REPLY_KINDS:
        raise ProtocolError(
            "malformed", f"{header['kind']} is not a request", header, authenticated=True
        )
    _validate_header(header, authenticated=True)
    return _check_vector(
        header,
        views[1:],
        expected_fingerprint=expected_fingerprint,
        layout_for=layout_for,
        authenticated=True,
    )


def decode_reply(
    frames: Sequence[Any],
    *,
    expected_fingerprint: str | None,
    layout_for: Callable[[dict], int | None],
    max_bytes: int,
) -> Message:
    """Validate and decode a reply (the worker's side), or raise ``ProtocolError``.

    The same checks as ``decode`` except the credential: a reply carries none, and one
    that does, or a request kind, is "malformed".
    """
    views, header = _open(frames, max_bytes)
    if isinstance(header.get("kind"), str) and header["kind"] in REQUEST_KINDS:
        raise ProtocolError("malformed", f"{header['kind']} is not a reply", header)
    _validate_header(header)
    return _check_vector(
        header,
        views[1:],
        expected_fingerprint=expected_fingerprint,
        layout_for=layout_for,
        authenticated=False,
    )


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """True when no array holds a NaN or an infinity (stops at the first that does)."""
    for array in arrays:
        array = np.asarray(array)
        if array.dtype.kind in "biu" or array.size == 0:
            continue
        if not np.isfinite(array).all():
            return False
    return True


# --------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------


ZAP_DOMAIN = "gorila"


class ServerCurve(NamedTuple):
    """The server's zmq CURVE key pair (z85 bytes, as `zmq.curve_keypair` makes them); the
    client keys it lets in are `start_curve_authenticator`'s."""

    public: bytes
    secret: bytes


class ClientCurve(NamedTuple):
    """A client's zmq CURVE key pair and the server public key it insists on (z85)."""

    public: bytes
    secret: bytes
    server: bytes


class _AllowedKeys:
    """The ZAP callback of `start_curve_authenticator`: membership in a set of keys."""

    def __init__(self, keys: Collection[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_curve_authenticator(
    context: zmq.Context, clients: Collection[bytes], *, wait_seconds: float = 5.0
):
    """Start the ZAP handler of `context` (a thread; `stop()` it when done) that admits a
    CURVE client only if its public key (z85) is in `clients`, looked up at every
    handshake (so a set filled in later counts). Start it before the server socket binds:
    a CURVE handshake without a ZAP handler admits any client key.

    A context has one ZAP address, and zmq releases it in the background after the
    previous handler's `stop()`: a server started again in the same process retries the
    bind for up to `wait_seconds` instead of failing with "Address already in use"."""
    from zmq.auth.thread import ThreadAuthenticator

    deadline = time.monotonic() + wait_seconds
    while True:
        authenticator = ThreadAuthenticator(context)
        try:
            authenticator.start()
            break
        except zmq.ZMQError as error:
            authenticator.stop()  # closes the socket that could not bind
            if error.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    authenticator.configure_curve_callback(ZAP_DOMAIN, _AllowedKeys(clients))
    return authenticator


_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class HandshakeWatch:
    """Why a client socket's connection never opened, from zmq's socket monitor.

    A handshake the server refuses (a CURVE key it does not admit, a CURVE client
    against a plain server or the reverse, the wrong server key) leaves the client with no
    connection and nothing to read: its requests go unanswered, or cannot even be queued.
    `failure()` names the cause so the error a user sees says what to fix, not only that
    the server was silent. `close()` before closing the socket.
    """

    def __init__(self, socket: zmq.Socket):
        self._socket = socket
        self._monitor = socket.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._failure: str | None = None

    def failure(self) -> str | None:
        """The last handshake failure seen on the socket (None: none so far)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            self._failure = _describe_handshake_failure(int(event["event"]), int(event["value"]))
        return self._failure

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._socket.disable_monitor()
        self._monitor.close(linger=0)


def _describe_handshake_failure(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the server refused this process's CURVE key (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return (
                "the server and this process disagree on wire security (CURVE on one side "
                "only): run every process with the same --wire-security"
            )
        return f"the handshake broke zmq's protocol (error {value:#x})"
    return (
        "the handshake failed: with CURVE, the server's key is not the one this process "
        "was given (a stale address or key?)"
    )


def message_limit(array_bytes: int) -> int:
    """The byte limit for messages whose arrays total at most ``array_bytes`` (the flat
    float32 parameter vector: 4 bytes per parameter): the largest legitimate message, a
    header and those arrays, plus one header's worth of headroom."""
    return int(array_bytes) + 2 * MAX_HEADER_BYTES


def make_server_socket(
    context: zmq.Context,
    bind_address: str,
    max_message_bytes: int,
    *,
    receive_queue: int = SERVER_RECEIVE_QUEUE,
    send_queue: int = SERVER_SEND_QUEUE,
    curve: ServerCurve | None = None,
) -> tuple[zmq.Socket, str]:
    """A bound ROUTER socket and the endpoint it actually bound.

    A port of 0 or ``*`` (``tcp://127.0.0.1:0``) binds a random free port. Sets
    ``MAXMSGSIZE`` (zmq disconnects a tcp/ipc peer that sends a larger frame), ``RCVHWM`` to
    ``receive_queue`` (whole messages zmq queues per peer before it stops reading from that
    peer), ``SNDHWM`` to ``send_queue`` with ``ROUTER_MANDATORY`` (a reply to a peer that
    already has that many waiting fails at once, with ``zmq.Again`` from a non-blocking
    `send`, so a peer that asks and never reads cannot make the server hold more than
    ``send_queue`` replies for it: at most 215 MB of Nature-CNN params, and less as they
    share the params of a version; a reply to a peer that is gone fails with EHOSTUNREACH)
    and ``LINGER`` 0. ``ROUTER_HANDOVER`` stays off: a peer that claims a routing id already
    connected is ignored, so nobody can take over the route of a bundle and receive its
    replies. With ``curve`` the socket is a CURVE server in the ZAP domain of
    `start_curve_authenticator`, which must be running in ``context``.
    """
    socket = context.socket(zmq.ROUTER)
    try:
        socket.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
        socket.setsockopt(zmq.RCVHWM, int(receive_queue))
        socket.setsockopt(zmq.SNDHWM, int(send_queue))
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            socket.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            socket.setsockopt(zmq.CURVE_SERVER, 1)
            socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        address = bind_address
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-2] + ":*"
        socket.bind(address)
        endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket, endpoint


def make_client_socket(
    context: zmq.Context,
    endpoint: str,
    identity: bytes | None,
    max_message_bytes: int,
    *,
    receive_timeout_ms: int | None = None,
    curve: ClientCurve | None = None,
    connect: bool = True,
) -> zmq.Socket:
    """A DEALER connected to ``endpoint``, with routing id ``identity``.

    ``identity`` None (what bundles use) lets the server's ROUTER assign a fresh routing
    id to the connection, one no other peer can claim. Sets ``MAXMSGSIZE``, ``LINGER`` 0
    and, when given, ``RCVTIMEO`` (``recv`` then raises ``zmq.Again`` on timeout; a late
    reply can still arrive afterwards, so match replies to requests by ``seq``). With
    ``curve`` the connection is CURVE-encrypted and made only to the server holding the
    secret key of ``curve.server``. With ``connect=False`` the caller connects it to
    ``endpoint`` (after attaching a `HandshakeWatch`, which sees only later handshakes).
    """
    if identity is not None and (not 1 <= len(identity) <= 255 or identity.startswith(b"\0")):
        raise ValueError("identity must be 1..255 bytes and not start with a zero byte")
    socket = context.socket(zmq.DEALER)
    try:
        if identity is not None:
            socket.setsockopt(zmq.IDENTITY, identity)
        if curve is not None:
            socket.setsockopt(zmq.CURVE_SERVERKEY, curve.server)
            socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        socket.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
        socket.setsockopt(zmq.LINGER, 0)
        if receive_timeout_ms is not None:
            socket.setsockopt(zmq.RCVTIMEO, int(receive_timeout_ms))
        if connect:
            socket.connect(endpoint)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


def send(
    socket: zmq.Socket,
    frames: Sequence[Any],
    routing_id: bytes | None = None,
    *,
    copy: bool = False,
    flags: int = 0,
) -> None:
    """Send ``frames`` (from ``encode``); a ROUTER needs the peer's ``routing_id``.

    With ``copy=False`` (default) large frames are sent without copying, so their
    arrays must stay unchanged until zmq has sent them. ``flags`` apply to the first
    frame (``zmq.NOBLOCK``: raise ``zmq.Again`` instead of waiting; once the first frame
    is taken, zmq takes the rest of the message).
    """
    parts = list(frames) if routing_id is None else [routing_id, *frames]
    # Frame by frame with int flags: send_multipart combines zmq's flag enums in Python,
    # which cost more than the send itself for an ack. Frames under 64 KiB are copied
    # (faster than a zero-copy frame for small ones; zmq does the same by default).
    last = len(parts) - 1
    first_flags = int(flags)
    for index, part in enumerate(parts):
        flags = (_SNDMORE if index < last else 0) | (first_flags if index == 0 else 0)
        socket.send(part, flags, copy=copy or len(part) < _COPY_THRESHOLD)


_SNDMORE = int(zmq.SNDMORE)
_COPY_THRESHOLD = 64 * 1024


class OversizedMessage(ProtocolError):
    """``recv`` refused a message over its frame or byte bound (already drained from the
    socket); ``routing_id`` is the sender's, for the error reply."""

    def __init__(self, message: str, routing_id: bytes | None):
        super().__init__("oversized", message)
        self.routing_id = routing_id


def _is_router(socket: zmq.Socket) -> bool:
    """Whether `socket` is a ROUTER (asked of zmq once per socket, then remembered)."""
    router = _ROUTERS.get(socket)
    if router is None:
        router = _ROUTERS[socket] = socket.getsockopt(zmq.TYPE) == zmq.ROUTER
    return router


_ROUTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def recv(
    socket: zmq.Socket,
    flags: int = 0,
    *,
    max_frames: int | None = None,
    max_bytes: int | None = None,
) -> tuple[bytes | None, list[zmq.Frame]]:
    """Receive one message: ``(routing_id, frames)`` from a ROUTER, ``(None, frames)``
    from a DEALER. Frames are zero-copy ``zmq.Frame``; ``frame.buffer`` is a memoryview.

    Frame by frame: once the message has more than ``max_frames`` frames or
    ``max_bytes`` bytes (the routing id not counted), what was kept is let go, every
    further frame is received and let go at once, and ``OversizedMessage`` is raised
    when the message is drained, so the socket is ready for the next one. ``flags``
    apply to the first frame only (zmq delivers the rest of a message with it).
    """
    routing_id = None
    flags = int(flags)
    if _is_router(socket):
        routing_id = socket.recv(flags)
        flags = 0
    frames: list[zmq.Frame] = []
    count, total, refused = 0, 0, None
    more = True
    while more:
        frame = socket.recv(flags, copy=False)
        flags = 0
        more = frame.more
        count += 1
        total += len(frame)
        if refused is None:
            if max_frames is not None and count > max_frames:
                refused = f"more than {max_frames} frames"
            elif max_bytes is not None and total > max_bytes:
                refused = f"more than {max_bytes} bytes"
            else:
                frames.append(frame)
                continue
            frames.clear()
        del frame
    if refused is not None:
        raise OversizedMessage(f"message of {refused}", routing_id)
    return routing_id, frames
