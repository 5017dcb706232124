"""Fuzzing the parameter server's wire over a real socket.

An attacker DEALER sends the server seeded streams of malformed messages: random bytes,
broken msgpack, truncated and extra frames, declared counts and byte lengths that do not
match, wrong dtypes, NaN/inf, wrong credentials (another worker's among them) and
fingerprints, replayed sequence numbers, out-of-range workers, protocol 2's fields (token,
loss, shard) and stats request, whole protocol 2 requests, huge fields and oversized
messages. Every message that reaches the server must get a reply with the rejection reason
predicted for it, be counted in `stats()["rejections"]` (against its worker only when it
carried that worker's credential), and change nothing; a real bundle pushing at the same
time must not notice. Messages with a frame over the socket's MAXMSGSIZE never reach the
server: zmq drops the connection that sent them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import zmq
from jax.flatten_util import ravel_pytree
from zmq.utils.monitor import recv_monitor_message

from gorila_jax.bundle.client import ServerConnection
from gorila_jax.core.config import Config
from gorila_jax.core.networks import MLP
from gorila_jax.server.parameter_server import MAX_REQUEST_FRAMES, ParameterServer
from gorila_jax.wire import credentials, transport
from gorila_jax.wire.credentials import WorkerAuthority

SECRET = hashlib.sha256(b"gorila_jax fuzz secret").hexdigest()
OTHER_SECRET = hashlib.sha256(b"another run's secret").hexdigest()
U64 = 2**64 - 1
REPLY_TIMEOUT_MS = 10_000
# Attacker messages in flight before it waits for a reply: a quarter of the replies the
# server queues for one peer. zmq counts that queue lazily: the sender learns of replies
# read only every half queue, so with half a queue in flight a reply was now and then
# dropped (1 run in 4 here), and the attacker matched the next reply to the wrong message.
WINDOW = transport.SERVER_SEND_QUEUE // 4
NUM_WORKERS = 2
CREDENTIALS = [credentials.worker_credential(SECRET, w) for w in range(NUM_WORKERS)]
ATTACKER = 1  # the worker the attacker says hello as; the bundle of test 2 is worker 0

Frames = list[bytes]


def make_config() -> Config:
    return dataclasses.replace(
        Config(),
        env_id="CartPole-v1",
        mlp_hidden=(16, 16),
        max_message_mb=1,
        stats_every_seconds=3600.0,
        seed=0,
    )


@functools.cache
def params_tree() -> dict:
    """The params of a CartPole-shaped MLP with hidden (16, 16): 4 observations, 2 actions."""
    network = MLP(num_actions=2, hidden=(16, 16))
    params = network.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.float32))["params"]
    return jax.tree.map(np.asarray, params)


def pack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def current(server: ParameterServer) -> np.ndarray:
    return np.array(server.params)


def authority() -> WorkerAuthority:
    return WorkerAuthority(NUM_WORKERS, secret=SECRET)


def push_and_wait(connection: ServerConnection, grads, **fields) -> tuple:
    """(accepted, reason, version) of one push, as the bundle's client sends it."""
    return connection.receive_ack(connection.send_push(grads, **fields))


def pull_and_wait(connection: ServerConnection, have_version: int) -> tuple:
    """(params or None, version) of one pull, as the bundle's client sends it."""
    return connection.receive_pulled(connection.send_pull(have_version))


class Served:
    """A ParameterServer served on tcp://127.0.0.1 by a thread, with its own zmq context."""

    def __init__(self):
        self.server = ParameterServer(
            make_config(), params_tree(), num_workers=NUM_WORKERS, authority=authority()
        )
        self.context = zmq.Context()
        self.socket, self.endpoint = transport.make_server_socket(
            self.context, "tcp://127.0.0.1:0", self.server.max_bytes
        )
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, name="fuzzed-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve(self.socket, self.endpoint, self.stop.is_set)
        except BaseException as error:
            self.errors.append(error)

    def assert_serving(self) -> None:
        assert not self.errors, f"the server crashed: {self.errors[0]!r}"
        assert self.thread.is_alive()

    def connect(self, worker: int) -> ServerConnection:
        return ServerConnection(
            self.endpoint,
            credential=CREDENTIALS[worker],
            worker=worker,
            fingerprint=self.server.fingerprint,
            num_params=self.server.num_params,
            max_bytes=self.server.max_bytes,
            timeout_seconds=REPLY_TIMEOUT_MS / 1000,
        )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "serve did not return"
        self.context.destroy(linger=0)


@pytest.fixture
def served():
    served = Served()
    try:
        yield served
    finally:
        served.close()


class Attacker:
    """A raw DEALER that keeps up to WINDOW messages in flight and checks every reply.

    Each bad message is sent with the set of rejection reasons it may get; replies come back
    in order, so each is matched to its message. `reasons` counts the reasons received.
    """

    def __init__(self, served: Served, identity: bytes):
        self.socket = transport.make_client_socket(
            served.context, served.endpoint, identity, served.server.max_bytes
        )
        self.served = served
        self.pending: deque[tuple[str, frozenset[str]]] = deque()
        self.reasons: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.bad = 0
        self.version = 0  # the server's version in the latest reply
        self.versions_seen: set[int] = set()

    def send_bad(self, category: str, frames: Frames, reasons) -> None:
        self.socket.send_multipart(frames, copy=True)
        self.pending.append((category, frozenset(reasons)))
        self.bad += 1
        self.categories[category] += 1
        while len(self.pending) >= WINDOW:
            self._check_reply()

    def drain(self) -> None:
        while self.pending:
            self._check_reply()

    def request(self, frames: Frames) -> dict:
        """Send a valid request and return its reply header."""
        self.drain()
        self.socket.send_multipart(frames, copy=True)
        return self._receive()

    def _receive(self) -> dict:
        for _ in range(REPLY_TIMEOUT_MS // 100):
            if self.socket.poll(100):
                break
            self.served.assert_serving()
        else:
            raise AssertionError(f"no reply within {REPLY_TIMEOUT_MS} ms")
        frames = self.socket.recv_multipart()
        assert SECRET.encode() not in frames[0]  # no reply gives the run secret away
        header = msgpack.unpackb(frames[0], raw=False)
        self.version = header["version"]
        self.versions_seen.add(header["version"])
        return header

    def _check_reply(self) -> None:
        category, reasons = self.pending.popleft()
        header = self._receive()
        if header["kind"] == "ack":
            assert header["accepted"] is False, f"{category}: a bad push was accepted"
        else:
            assert header["kind"] == "error", f"{category}: got a {header['kind']} reply"
        assert header["reason"] in reasons, f"{category}: {header}, expected {set(reasons)}"
        assert "credential" not in header  # no reply carries a credential
        self.reasons[header["reason"]] += 1

    def close(self) -> None:
        self.socket.close(linger=0)


def random_text(rng: np.random.Generator, length: int) -> str:
    """Random code points below U+0250 (no surrogates), control characters included."""
    return "".join(map(chr, rng.integers(0, 0x250, size=length)))


class Fuzzer:
    """Seeded malformed messages, each with the rejection reasons the server may give it.

    The attacker holds a valid worker id (`worker`, said hello with seq `last_seq`) and the
    run secret, so it can sign as any worker (as a task of a SLURM job with token security
    can) and messages can fail at every stage of validation. `self.last_seq` follows the
    server's `last_seq[worker]`: messages that get past decoding with a fresh seq move it.
    `victim` is (worker, seq) of another worker that has used seqs up to `seq` already; the
    only messages signed as the victim are refused replays (`victim_refusals` counts them),
    so nothing can lock it out.
    """

    def __init__(
        self,
        seed: int,
        server: ParameterServer,
        attacker: Attacker,
        *,
        worker: int,
        last_seq: int,
        victim: tuple[int, int] | None = None,
    ):
        self.rng = np.random.default_rng(seed)
        self.fingerprint = server.fingerprint
        self.num_params = server.num_params
        self.max_bytes = server.max_bytes
        self.attacker = attacker
        self.worker = worker
        self.last_seq = last_seq
        self.victim = victim
        self.victim_refusals = 0
        self.categories: dict[str, tuple[float, Callable[[], tuple[Frames, set[str]]]]] = {
            "random_bytes": (1.0, self.random_bytes),
            "not_msgpack": (1.0, self.not_msgpack),
            "truncated_header": (1.0, self.truncated_header),
            "trailing_bytes_after_header": (1.0, self.trailing_bytes_after_header),
            "header_not_a_map": (1.0, self.header_not_a_map),
            "deep_nesting": (0.5, self.deep_nesting),
            "ext_or_bad_key": (0.5, self.ext_or_bad_key),
            "empty_frames": (0.5, self.empty_frames),
            "bad_protocol": (1.0, self.bad_protocol),
            "protocol_2_request": (0.5, self.protocol_2_request),
            "wrong_credential": (1.0, self.wrong_credential),
            "another_workers_credential": (1.0, self.another_workers_credential),
            "huge_credential": (0.3, self.huge_credential),
            "bad_schema": (2.0, self.bad_schema),
            "protocol_2_fields": (1.0, self.protocol_2_fields),
            "wrong_fingerprint": (1.0, self.wrong_fingerprint),
            "frame_count": (1.5, self.frame_count),
            "byte_length": (1.5, self.byte_length),
            "worker_out_of_range": (1.0, self.worker_out_of_range),
            "non_finite": (1.5, self.non_finite),
            "stale_version": (1.0, self.stale_version),
            "replayed_seq": (1.5, self.replayed_seq),
            "future_seq": (0.5, self.future_seq),
            "implausible_frames": (0.5, self.implausible_frames),
            "reply_kind": (0.5, self.reply_kind),
            "oversized_header": (0.3, self.oversized_header),
            "oversized_total": (0.02, self.oversized_total),
        }
        names = list(self.categories)
        weights = np.array([self.categories[name][0] for name in names])
        self._names = names
        self._probabilities = weights / weights.sum()
        self._first_round = deque(names)  # every category at least once, first

    def send(self, count: int) -> None:
        """Send `count` bad messages through the attacker."""
        for _ in range(count):
            if self._first_round:
                name = self._first_round.popleft()
            else:
                name = self._names[self.rng.choice(len(self._names), p=self._probabilities)]
            frames, reasons = self.categories[name][1]()
            if len(frames) > MAX_REQUEST_FRAMES:
                reasons = {"oversized"}  # refused as it is received, before decoding
            self.attacker.send_bad(name, frames, reasons)

    # ---- building blocks ------------------------------------------------------------------

    def pick(self, options: list):
        return options[int(self.rng.integers(len(options)))]

    def number(self, high: int) -> int:
        return int(self.rng.integers(0, high))

    def fresh_seq(self) -> int:
        self.last_seq += 1 + self.number(3)
        return self.last_seq

    def credential(self, worker) -> str:
        """`worker`'s credential (the attacker's own for a worker that is not an int)."""
        return credentials.worker_credential(SECRET, worker if type(worker) is int else self.worker)

    def header(self, kind: str = "push", **changes) -> dict:
        """A valid header but for `changes` (seq: random unless given; the credential of
        the worker it names unless given)."""
        header = {
            "kind": kind,
            "protocol": transport.PROTOCOL_VERSION,
            "credential": self.credential(changes.get("worker", self.worker)),
            "worker": self.worker,
            "seq": self.number(2**62),
            "version": self.attacker.version,
            "fingerprint": self.fingerprint,
            "arrays": 1 if kind == "push" else 0,
        }
        if kind == "push":
            header |= {"mean_abs_td": 1.0, "frames": 0}
        return header | changes

    def grads(self, size: int | None = None, dtype=np.float32) -> bytes:
        size = self.num_params if size is None else size
        return (0.01 * self.rng.standard_normal(size)).astype(dtype).tobytes()

    def push(self, **changes) -> Frames:
        """A push with a finite gradient of the right size: only `changes` can spoil it."""
        return [pack(self.header("push", **changes)), self.grads()]

    # ---- categories -----------------------------------------------------------------------

    def random_bytes(self):
        frames = [self.rng.bytes(self.number(300)) for _ in range(1 + self.number(3))]
        return frames, {"malformed"}

    def not_msgpack(self):
        return [b"\xc1" + self.rng.bytes(self.number(100)), self.grads()], {"malformed"}

    def truncated_header(self):
        packed = pack(self.header())
        return [packed[: self.number(len(packed))], self.grads()], {"malformed"}

    def trailing_bytes_after_header(self):
        extra = self.pick([bytes(self.number(30_000)), self.rng.bytes(1 + self.number(30_000))])
        return [pack(self.header()) + extra, self.grads()], {"malformed"}

    def header_not_a_map(self):
        value = self.pick([[1, 2, 3], 7, "push", None, b"push", 1.5, True, [self.header()]])
        return [pack(value), self.grads()], {"malformed"}

    def deep_nesting(self):
        depth = 1_000 + self.number(20_000)
        nested = self.pick([b"\x91" * depth + b"\xc0", b"\x81\xa1k" * depth + b"\xc0"])
        return [nested], {"malformed"}

    def ext_or_bad_key(self):
        header = self.header()
        choice = self.number(3)
        if choice == 0:
            header["mean_abs_td"] = msgpack.ExtType(1, b"1.0")
        elif choice == 1:
            header[7] = "int key"
        else:
            header[b"kind"] = "bytes key"
        return [pack(header), self.grads()], {"malformed"}

    def empty_frames(self):
        return [b""] * (1 + self.number(4)), {"malformed"}

    def bad_protocol(self):
        version = transport.PROTOCOL_VERSION
        protocol = self.pick(
            [0, version - 1, version + 1, -1, 99, 2**63, U64, -(2**63), "1", 1.0, None, True,
             "drop"]
        )  # fmt: skip
        header = self.header()
        if protocol == "drop":
            del header["protocol"]
        else:
            header["protocol"] = protocol
        is_int = isinstance(protocol, int) and not isinstance(protocol, bool)
        reason = "bad_protocol" if is_int else "malformed"
        return [pack(header), self.grads()], {reason}

    def protocol_2_request(self):
        """A request as a bundle of protocol 2 sent it (the run token, a push's loss and
        shard, the stats request): refused for its version before anything else."""
        kind = self.pick(["hello", "pull", "push", "push", "stats", "stop"])
        header = {
            "kind": kind, "protocol": 2, "token": self.pick([SECRET, CREDENTIALS[self.worker]]),
            "worker": self.pick([self.worker, NUM_WORKERS]), "seq": self.pick([U64, 0, 1]),
            "version": self.attacker.version, "fingerprint": self.fingerprint,
            "arrays": int(kind == "push"),
        }  # fmt: skip
        if kind == "push":
            header |= {"loss": 1.0, "shard": self.pick([None, 0]), "frames": 2**60}
            return [pack(header), self.grads()], {"bad_protocol"}
        return [pack(header)], {"bad_protocol"}

    def wrong_credential(self):
        """A push good in every other way, for this or another worker, with a credential
        that is not that worker's."""
        worker = self.victim[0] if self.victim and self.number(2) else self.worker
        own = CREDENTIALS[worker]
        credential = self.pick(
            [
                self.rng.bytes(32).hex(),
                "",
                own[:-1],
                own + "0",
                own.upper(),
                own[::-1],
                SECRET,  # the run secret is no credential
                credentials.worker_credential(OTHER_SECRET, worker),  # another run's
                own.encode(),
                None,
                123,
                [own],
                "drop",
            ]
        )
        header = self.header(worker=worker, seq=10**9 + self.number(10**6))
        if credential == "drop":
            del header["credential"]
        else:
            header["credential"] = credential
        valid_type = isinstance(credential, str) and credential != "drop"
        return [pack(header), self.grads()], {"bad_credential" if valid_type else "malformed"}

    def another_workers_credential(self):
        """A request good in every way but one, it carries another worker's credential (in
        the victim's name with the attacker's, or the reverse): a stop, a seq that would
        lock the worker out, an absurd frame count are all refused before they are read."""
        other = NUM_WORKERS - 1 - self.worker
        worker, signer = self.pick([(other, self.worker), (self.worker, other)])
        kind = self.pick(["push", "push", "stop", "hello", "pull"])
        seq = self.pick([U64, 2**63, time.time_ns() + self.number(10**9)])
        changes = {"worker": worker, "credential": CREDENTIALS[signer], "seq": seq}
        if kind == "push":
            changes["frames"] = self.pick([0, 2**60])
            return self.push(**changes), {"bad_credential"}
        return [pack(self.header(kind, **changes))], {"bad_credential"}

    def huge_credential(self):
        """A header up to and over MAX_HEADER_BYTES, nearly all of it a wrong credential."""
        length = transport.MAX_HEADER_BYTES - 1_000 + self.number(1_200)
        credential = self.pick(["x" * length, "\0" * length, random_text(self.rng, length // 2)])
        header = pack(self.header(credential=credential))
        too_big = len(header) > transport.MAX_HEADER_BYTES
        return [header, self.grads()], {"oversized" if too_big else "bad_credential"}

    def bad_schema(self):
        """Valid credential, then a header that breaks the schema (a worker below 0 is no
        worker: refused as such before its credential is looked at)."""
        header = self.header(self.pick(["push", "pull", "stop", "hello"]))
        broken = {
            "worker": [-1, True, "1", 1.5, None],
            "seq": [-1, -(2**63), "7", None, 2.0],
            "version": [-2, -(2**63), "0", 0.0, None],
            "fingerprint": [5, None, self.fingerprint.encode(), [self.fingerprint]],
            "arrays": [-1, "1", None, 1.0],
            "mean_abs_td": ["1.0", None, [1.0], {"x": 1}],
            "frames": [-1, 2.5, "0", None],
        }
        reasons = {"malformed"}
        choice = self.number(4)
        if choice == 0:
            kind_length = 1 + self.number(16_000)
            header["kind"] = self.pick(
                ["", "PUSH", "push ", 5, None, "\0" * kind_length, random_text(self.rng, 40)]
            )
        elif choice == 1:
            name = self.pick([n for n in header if n not in ("protocol", "credential")])
            del header[name]
        elif choice == 2:
            name = self.pick(list(broken))
            kind = "push" if name in ("mean_abs_td", "frames") else header["kind"]
            value = self.pick(broken[name])
            header = self.header(kind) | {name: value}
            if name == "worker" and type(value) is int and value == -1:
                reasons = {"bad_worker"}
        else:
            header[self.pick(["extra", "\0", "kind ", "x" * 5_000])] = self.number(10)
        frames = [pack(header)]
        if header.get("kind") == "push":
            frames.append(self.grads())
        return frames, reasons

    def protocol_2_fields(self):
        """Protocol 2's fields and kinds in a protocol 3 header with a valid credential: a
        push's shard or loss, the run token, the stats request and its reply."""
        choice = self.pick(
            ["shard", "loss_for_mean_abs_td", "loss_too", "token_for_credential", "token_too",
             "stats", "stats_reply"]
        )  # fmt: skip
        header = self.header("push")
        if choice == "shard":
            header["shard"] = self.pick([None, 0, self.worker, NUM_WORKERS])
        elif choice == "loss_for_mean_abs_td":
            header["loss"] = header.pop("mean_abs_td")
        elif choice == "loss_too":
            header["loss"] = header["mean_abs_td"]
        elif choice == "token_for_credential":
            header = self.header(self.pick(["push", "hello", "pull", "stop"]))
            header["token"] = header.pop("credential")
        elif choice == "token_too":
            header = self.header(self.pick(["push", "hello", "pull", "stop"]))
            header["token"] = self.pick([SECRET, header["credential"]])
        elif choice == "stats":
            header = self.header("stats")
        else:
            header = self.header("stats_reply", stats={})
        frames = [pack(header)]
        if header["kind"] == "push":
            frames.append(self.grads())
        return frames, {"malformed"}

    def wrong_fingerprint(self):
        fingerprint = self.pick(
            [
                hashlib.sha256(self.rng.bytes(8)).hexdigest()[:32],
                "",
                self.fingerprint[:-1],
                "\0" * (1 + self.number(60_000)),
                "f" * (1 + self.number(60_000)),
            ]
        )
        changes = {"fingerprint": fingerprint, "seq": self.pick([U64, 0, self.number(2**62)])}
        if self.number(2):
            changes["version"] = self.pick([U64, 2**63, self.attacker.version])
        return self.push(**changes), {"bad_fingerprint"}

    def frame_count(self):
        """The declared array count, the frames sent and the layout disagree."""
        kind, declared, sent = self.pick(
            [
                ("push", 1, 0),
                ("push", 1, 2),
                ("push", 0, 0),
                ("push", 0, 1),
                ("push", 2, 2),
                ("push", 3, 1),
                ("push", U64, 1),
                ("pull", 0, 1),
                ("pull", 1, 1),
                ("stop", 1, 0),
                ("hello", 2, 2),
            ]
        )
        header = self.header(kind, arrays=declared)
        return [pack(header), *(self.grads() for _ in range(sent))], {"bad_frames"}

    def byte_length(self):
        """One array frame whose byte length is not num_params float32s."""
        n = self.num_params
        frame = self.pick(
            [
                lambda: self.grads(n - 1 - self.number(n)),
                lambda: self.grads(n + 1 + self.number(n)),
                lambda: b"",
                lambda: self.grads() + self.rng.bytes(1 + self.number(3)),
                lambda: self.grads()[: -1 - self.number(3)],
                lambda: self.grads(dtype=np.float64),
                lambda: self.grads(dtype=np.float16),
                lambda: np.full(n, np.nan, np.float64).tobytes(),
            ]
        )()
        return [pack(self.header()), frame], {"bad_frames"}

    def worker_out_of_range(self):
        """A worker the server does not have, whatever credential comes with it: refused
        before the credential is looked at."""
        worker = self.pick([NUM_WORKERS, NUM_WORKERS + self.number(2**32), 2**63, U64])
        credential = self.pick(
            [CREDENTIALS[self.worker], self.credential(worker), "", self.rng.bytes(8).hex()]
        )
        kind = self.pick(["push", "push", "pull", "hello", "stop"])
        if kind == "push":
            return self.push(worker=worker, credential=credential), {"bad_worker"}
        header = self.header(kind, worker=worker, credential=credential)
        return [pack(header)], {"bad_worker"}

    def non_finite(self):
        """A fresh, current push whose gradient or mean_abs_td holds a NaN or an infinity."""
        grads = (0.01 * self.rng.standard_normal(self.num_params)).astype(np.float32)
        mean_abs_td = 1.0
        if self.number(4):
            bad = self.rng.choice(self.num_params, size=1 + self.number(4), replace=False)
            grads[bad] = self.pick([np.nan, np.inf, -np.inf])
            if self.number(8) == 0:
                grads[:] = np.nan
        else:
            mean_abs_td = self.pick([float("nan"), float("inf"), float("-inf")])
        header = self.header(seq=self.fresh_seq(), mean_abs_td=mean_abs_td)
        return [pack(header), grads.tobytes()], {"non_finite"}

    def stale_version(self):
        """A fresh push, finite, but on no version the server has had."""
        version = self.pick([-1, self.attacker.version + 1_000 + self.number(1_000), 2**62, U64])
        return self.push(seq=self.fresh_seq(), version=version), {"stale"}

    def replayed_seq(self):
        """A push or pull that is valid but for a seq already used by its worker (signed
        as that worker: the victim's replays are refused all the same)."""
        worker, last = self.worker, self.last_seq
        if self.victim and self.number(2):
            worker, last = self.victim
            self.victim_refusals += 1
        seq = self.pick([last, self.number(last + 1), 0])
        if self.number(4) == 0:
            return [pack(self.header("pull", worker=worker, seq=seq, version=-1))], {"replayed"}
        return self.push(worker=worker, seq=seq), {"replayed"}

    def future_seq(self):
        """A push or pull, valid but for a seq far ahead of the server's clock (in ns): it
        would lock the worker's real requests out as replayed."""
        seq = self.pick([U64, 2**63, time.time_ns() + 10**13 + self.number(10**12)])
        if self.number(2):
            return [pack(self.header("pull", seq=seq, version=-1))], {"future_seq"}
        return self.push(seq=seq), {"future_seq"}

    def implausible_frames(self):
        """A fresh, current push whose frame count jumps further than a bundle could go."""
        frames = self.pick([2**60, U64, 10**15 + self.number(10**12)])
        return self.push(seq=self.fresh_seq(), frames=frames), {"implausible_frames"}

    def reply_kind(self):
        kind, fields = self.pick(
            [
                ("welcome", {"config": {}}),
                ("params", {}),
                ("not_modified", {}),
                ("ack", {"accepted": True, "reason": None}),
                ("error", {"reason": "stale", "message": "x" * self.number(1000)}),
            ]
        )
        # Refused while decoding, before the seq check: any seq, and last_seq stays.
        return [pack(self.header(kind, **fields))], {"malformed"}

    def oversized_header(self):
        size = transport.MAX_HEADER_BYTES + 1 + self.number(4_000)
        header = self.pick([self.rng.bytes(size), pack(self.header(padding="p" * size))])
        return [header, self.grads()], {"oversized"}

    def oversized_total(self):
        """Every frame under max_bytes (zmq lets it in), their sum over it."""
        half = bytes(self.max_bytes // 2 + 1 + self.number(1_000))
        return [pack(self.header(arrays=2)), half, half], {"oversized"}


def request(server: ParameterServer, kind: str, *, worker: int, seq: int, arrays=()) -> Frames:
    """The frames of a valid request."""
    header = transport.make_header(
        kind,
        credential=CREDENTIALS[worker],
        worker=worker,
        seq=seq,
        version=-1,
        fingerprint=server.fingerprint,
    )
    return [bytes(frame) for frame in transport.encode(header, arrays)]


def push_header(server: ParameterServer, *, worker: int, seq: int) -> bytes:
    """The header of a valid push (its one array frame is up to the caller)."""
    header = transport.make_header(
        "push",
        credential=CREDENTIALS[worker],
        worker=worker,
        seq=seq,
        version=0,
        fingerprint=server.fingerprint,
        mean_abs_td=1.0,
        frames=0,
    )
    return pack(header | {"protocol": transport.PROTOCOL_VERSION, "arrays": 1})


def over_the_socket_limit(server: ParameterServer) -> list[Frames]:
    """Messages with a frame of more than max_bytes: zmq drops the connection."""
    header = push_header(server, worker=0, seq=10**6)
    return [
        [bytes(server.max_bytes + 1)],
        [header, bytes(server.max_bytes + 1)],
        [header, bytes(server.max_bytes + 4096), bytes(16)],
    ]


def assert_dropped_by_the_socket(served: Served, messages: list[Frames]) -> None:
    """Send `messages` on a connection of their own, wait until zmq has dropped that
    connection, then close it (so nothing still queued on it can follow)."""
    socket = transport.make_client_socket(
        served.context, served.endpoint, b"too-big", served.server.max_bytes
    )
    monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        for frames in messages:
            socket.send_multipart(frames, copy=True)
        events: list[int] = []
        while zmq.EVENT_DISCONNECTED not in events:
            assert monitor.poll(REPLY_TIMEOUT_MS), f"connection not dropped; events {events}"
            events.append(recv_monitor_message(monitor)["event"])
        assert not socket.poll(0), "an oversized message got a reply"
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)
        socket.close(linger=0)


def initial_flat() -> np.ndarray:
    return np.asarray(ravel_pytree(params_tree())[0])


def assert_counted_where_due(stats: dict, reasons: Counter) -> None:
    """Every rejection is counted once, against the worker whose credential the request
    carried or under "unauthenticated"; what is refused before the credential is checked
    (or for it) is never a worker's, what is refused after it always is; no worker the
    server lacks gets a row."""
    against_workers = sum(w.get("rejected", 0) for w in stats["workers"].values())
    unauthenticated = stats["unauthenticated"].get("rejected", 0)
    assert against_workers + unauthenticated == sum(stats["rejections"].values())
    before = ("bad_protocol", "bad_credential", "bad_worker", "oversized")
    after = ("bad_fingerprint", "bad_frames", "replayed", "future_seq", "stale", "non_finite",
             "implausible_frames")  # fmt: skip
    assert unauthenticated >= sum(reasons[reason] for reason in before) > 0
    assert against_workers >= sum(reasons[reason] for reason in after) > 0
    assert set(stats["workers"]) <= {str(w) for w in range(NUM_WORKERS)}


# ---- tests ---------------------------------------------------------------------------------


def test_fuzz_params_bit_identical(served):
    server = served.server
    before, version = current(server), server.version
    assert np.array_equal(before, initial_flat())
    attacker = Attacker(served, b"attacker")
    try:
        welcome = attacker.request(request(server, "hello", worker=ATTACKER, seq=1))
        assert welcome["kind"] == "welcome"
        fuzzer = Fuzzer(1234, server, attacker, worker=ATTACKER, last_seq=1)
        fuzzer.send(10_000)
        attacker.drain()
        served.assert_serving()

        # Messages over the socket's limit: dropped by zmq, never seen by the server.
        dropped = over_the_socket_limit(server)
        assert_dropped_by_the_socket(served, dropped)

        # The attacker's own connection still gets answers.
        reply = attacker.request(request(server, "pull", worker=ATTACKER, seq=fuzzer.fresh_seq()))
        assert (reply["kind"], reply["version"]) == ("params", version)
        stats = server.stats()
    finally:
        attacker.close()

    assert attacker.bad >= 10_000
    assert set(attacker.categories) == set(fuzzer.categories)
    assert sum(attacker.reasons.values()) == attacker.bad
    assert stats["rejections"] == dict(attacker.reasons)
    assert_counted_where_due(stats, attacker.reasons)
    # Worker 0's name was used, with credentials that are not its own: nothing of its.
    assert set(stats["workers"]) == {str(ATTACKER)}

    # A fresh client is served normally, and nothing has changed.
    client = served.connect(worker=0)
    try:
        flat, client_version, _ = client.hello()
        assert client_version == version
        assert np.array_equal(flat, before)
        assert pull_and_wait(client, version) == (None, version)
    finally:
        client.close()
    served.assert_serving()
    final = server.stats()
    assert final["rejections"] == dict(attacker.reasons)  # the dropped ones are not counted
    assert "rejected" not in final["workers"]["0"]
    assert sum(final["rejections"].values()) == attacker.bad
    assert final["version"] == server.version == version
    assert final["staleness_histogram"] == {}
    assert np.array_equal(current(server), before)  # bit-identical


def test_fuzz_alongside_training_bundle(served):
    server = served.server
    rounds, pushes_per_round, bad_per_round = 10, 20, 210
    bundle = served.connect(worker=0)
    attacker = Attacker(served, b"attacker")
    go, done, abort = threading.Semaphore(0), threading.Semaphore(0), threading.Event()
    pushed: list[tuple[np.ndarray, int]] = []
    results: list[tuple[bool, str | None, int]] = []
    failures: list[BaseException] = []

    def train() -> None:
        """The bundle: rounds of pushes on the version its last ack gave, then a pull."""
        rng = np.random.default_rng(7)
        version = 0
        try:
            for round_index in range(rounds):
                while not go.acquire(timeout=0.1):
                    if abort.is_set():
                        return
                for step in range(pushes_per_round):
                    grads = (0.01 * rng.standard_normal(server.num_params)).astype(np.float32)
                    frames = (round_index * pushes_per_round + step + 1) * 100
                    accepted, reason, new_version = push_and_wait(
                        bundle, grads, base_version=version, mean_abs_td=1.0, frames=frames
                    )
                    pushed.append((grads, version))
                    results.append((accepted, reason, new_version))
                    version = new_version
                assert pull_and_wait(bundle, version) == (None, version)
                done.release()
        except BaseException as error:
            failures.append(error)
            done.release()

    trainer = threading.Thread(target=train, name="bundle", daemon=True)
    try:
        flat, version, _ = bundle.hello()  # the bundle's seq 1
        assert version == 0 and np.array_equal(flat, initial_flat())
        welcome = attacker.request(request(server, "hello", worker=ATTACKER, seq=1))
        assert welcome["kind"] == "welcome"
        fuzzer = Fuzzer(99, server, attacker, worker=ATTACKER, last_seq=1, victim=(0, 1))
        trainer.start()
        for _ in range(rounds):
            go.release()  # the bundle pushes while the attacker sends
            fuzzer.send(bad_per_round)
            attacker.drain()
            assert done.acquire(timeout=60), "the bundle stalled"
            assert not failures, f"the bundle failed: {failures[0]!r}"
        served.assert_serving()
        stats = server.stats()
    finally:
        abort.set()
        trainer.join(timeout=10)
        attacker.close()
        bundle.close()

    total = rounds * pushes_per_round
    assert attacker.bad >= 2_000
    assert set(attacker.categories) == set(fuzzer.categories)
    assert results == [(True, None, step + 1) for step in range(total)]
    assert stats["version"] == server.version == total
    assert stats["staleness_histogram"] == {"0": total}
    assert stats["workers"]["0"]["accepted"] == total
    assert stats["frames"] == total * 100  # the attacker's fresh pushes carry frames 0
    assert sum(attacker.reasons.values()) == attacker.bad
    assert stats["rejections"] == dict(attacker.reasons)
    assert_counted_where_due(stats, attacker.reasons)
    # Counted against the bundle's worker: only the replays signed as it, refused.
    assert fuzzer.victim_refusals > 0
    assert stats["workers"]["0"].get("rejected", 0) == fuzzer.victim_refusals
    assert not server.stopped_workers
    # The attacker's replies carried versions from the start to the end of training.
    assert min(attacker.versions_seen) <= pushes_per_round
    assert max(attacker.versions_seen) >= total - pushes_per_round

    # The params are exactly those of the bundle's pushes applied alone, in order.
    reference = ParameterServer(
        make_config(), params_tree(), num_workers=NUM_WORKERS, authority=authority()
    )
    for grads, base_version in pushed:
        reference.apply(0, grads, base_version)
    assert np.array_equal(current(server), current(reference))
    assert not np.array_equal(current(server), initial_flat())


def test_socket_enforces_max_message_size(served):
    server = served.server
    before = current(server)
    assert served.socket.getsockopt(zmq.MAXMSGSIZE) == server.max_bytes
    client = served.connect(worker=0)
    try:
        client.hello()
        assert_dropped_by_the_socket(served, over_the_socket_limit(server))
        served.assert_serving()

        # A frame of exactly max_bytes gets through zmq; decode refuses the whole message.
        attacker = Attacker(served, b"at-the-limit")
        try:
            frames = [push_header(server, worker=1, seq=1), bytes(server.max_bytes)]
            attacker.send_bad("at_the_limit", frames, {"oversized"})
            attacker.drain()
        finally:
            attacker.close()
        assert pull_and_wait(client, 0) == (None, 0)  # the client connected before is unaffected
    finally:
        client.close()

    fresh = served.connect(worker=1)
    try:
        flat, version, _ = fresh.hello()
    finally:
        fresh.close()
    served.assert_serving()
    stats = server.stats()
    assert version == 0 and np.array_equal(flat, before)
    assert stats["rejections"] == {"oversized": 1}
    assert server.version == 0
    assert np.array_equal(current(server), before)
