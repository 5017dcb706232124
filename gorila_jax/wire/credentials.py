"""Who may act for which worker: the run secret, each worker's credential, and the
server's check of both.

A run has one secret (`new_run_secret`, 32 random bytes as hex). The server's shards hold
it; a bundle holds only its own worker's credential, `worker_credential(secret, worker)`
(an HMAC-SHA256 of the worker index under the secret), so with the credential of one
worker nobody can send a request as another: no `stop` for every worker, no sequence
number that locks another worker out, no frame count in another's name. Where the
credentials go depends on who started the run:

- the local launcher makes the secret, gives it to the shards and gives each bundle its
  own credential only (`ENV_RUN_SECRET`, `ENV_WORKER_CREDENTIAL`): a credential that
  leaks, or a bundle that misbehaves, acts for its own worker only. (A hostile program
  under the same account is another matter: it can read the shards' environment.)
- under SLURM every task reads the secret (`gorila_jax.wire.rendezvous.slurm_run_secret`:
  the job's environment or a file only the user can read) and derives what its role
  needs, so there a task of the job could derive another worker's credential. With
  `--wire-security curve` the worker is named by the CURVE key its connection was made
  with instead, and no bundle holds a credential that could act for another; but every
  task holds the key that signs the rendezvous, so a hostile task of the same job could
  still publish a key in another bundle's name before it (that bundle then stops with one
  line). Both modes protect a run from outsiders, not from its own tasks.

A bundle that joins a running job (`--join`) reads the secret from the job's join file
(`gorila_jax.wire.join_file`, as a task under SLURM reads RUN_DIR/run_secret), asks for a
worker index with `join_credential`, which names no worker and so acts for none, and then
presents the credential of the worker it was given.

`WorkerAuthority` is the server's side of it: given a request's header (and, with CURVE,
the client key zmq authenticated the connection with), it says which worker sent it or
raises the protocol error that refuses it. Secrets and credentials are compared in
constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from gorila_jax.wire.transport import ProtocolError

ENV_RUN_SECRET = "GORILA_RUN_SECRET"
ENV_WORKER_CREDENTIAL = "GORILA_WORKER_CREDENTIAL"
SECRET_BYTES = 32


def new_run_secret() -> str:
    """A fresh run secret: 32 random bytes as hex."""
    return secrets.token_hex(SECRET_BYTES)


def check_run_secret(secret: str, where: str) -> str:
    """`secret` if it is one (at least 32 hex digits), else ValueError naming `where`."""
    try:
        raw = bytes.fromhex(secret)
    except ValueError:
        raw = b""
    if len(raw) < 16:
        raise ValueError(f"{where}: a run secret must be at least 32 hex digits")
    return secret


def _mac(secret: str, text: str) -> str:
    return hmac.new(bytes.fromhex(secret), text.encode("utf-8"), hashlib.sha256).hexdigest()


def worker_credential(secret: str, worker: int) -> str:
    """Worker `worker`'s credential in the run of `secret` (64 hex digits)."""
    return _mac(secret, f"gorila worker {int(worker)}")


def aggregator_credential(secret: str, aggregator: int) -> str:
    """Aggregator `aggregator`'s credential (64 hex digits): the server's worker of that
    index in a run with `--aggregate-per-host`. Derived apart from the bundles' own, so no
    bundle's credential acts for an aggregator."""
    return _mac(secret, f"gorila aggregator {int(aggregator)}")


def join_credential(secret: str) -> str:
    """What a bundle started with `--join` presents to ask for a worker index (64 hex
    digits): it names no worker, so it cannot act for one; the server answers with a free
    index, whose credential the joining bundle derives from the secret it read in the
    run's join file."""
    return _mac(secret, "gorila join")


def sign(secret: str, name: str, value: str) -> str:
    """A signature of `value` published under `name` (the rendezvous store's values):
    only a holder of the run secret can make one."""
    return _mac(secret, f"gorila rendezvous {name}={value}")


def signature_matches(secret: str, name: str, value: str, signature: str) -> bool:
    """Whether `signature` is `sign(secret, name, value)` (constant time; any text)."""
    expected = sign(secret, name, value).encode("ascii")
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


def rendezvous_key(secret: str) -> str:
    """The key that signs what the rendezvous store carries: every process of the run
    holds it (a bundle too, which does not hold the secret), and nothing derives a
    credential from it."""
    return _mac(secret, "gorila rendezvous key")


class WorkerAuthority:
    """The server's check of who sent a request: with token security (`secret`), the
    header's credential must be its worker's; with CURVE (`curve_workers`: each bundle's
    z85 public key -> its worker index) the connection's key must be the worker's, and the
    header's credential is empty."""

    def __init__(
        self,
        num_workers: int,
        *,
        secret: str | None = None,
        curve_workers: Mapping[bytes, int] | None = None,
        aggregators: bool = False,
    ):
        """`aggregators`: the workers are a run's aggregators (`aggregator_credential`),
        not its bundles."""
        if (secret is None) == (curve_workers is None):
            raise ValueError("give the run secret (token security) or the CURVE keys, not both")
        self.num_workers = num_workers
        self.curve_workers = curve_workers
        self._credentials = (
            None
            if secret is None
            else [
                (aggregator_credential if aggregators else worker_credential)(secret, w).encode()
                for w in range(num_workers)
            ]
        )
        # A join names no worker yet: it proves the run's join credential instead (token
        # security only; with CURVE a bundle's key must be known when its worker starts).
        self._join = None if secret is None else join_credential(secret).encode()

    def check(self, header: dict, client_key: str | bytes | None = None) -> None:
        """Return if `header` comes from the worker it names; else raise ProtocolError,
        "bad_worker" (no such worker) or "bad_credential". `client_key`: the z85 CURVE key
        zmq authenticated the request's connection with (its "User-Id")."""
        worker = header.get("worker")
        credential = header.get("credential")
        if type(worker) is not int or not isinstance(credential, str):
            raise ProtocolError(
                "malformed", "fields 'worker' and 'credential' are required", header
            )
        if header.get("kind") == "join":
            if self._join is None or not hmac.compare_digest(
                credential.encode("utf-8"), self._join
            ):
                raise ProtocolError("bad_credential", "not the run's join credential", header)
            return
        if not 0 <= worker < self.num_workers:
            raise ProtocolError("bad_worker", f"worker {worker} >= {self.num_workers}", header)
        if self._credentials is not None:
            if not hmac.compare_digest(credential.encode("utf-8"), self._credentials[worker]):
                raise ProtocolError("bad_credential", f"not worker {worker}'s credential", header)
            return
        if isinstance(client_key, str):
            client_key = client_key.encode("ascii")
        if client_key is None or self.curve_workers.get(client_key) != worker:
            raise ProtocolError(
                "bad_credential", f"the connection's CURVE key is not worker {worker}'s", header
            )
