"""Who may act for which worker (gorila_jax.wire.credentials) and the signed rendezvous
(gorila_jax.wire.rendezvous): credentials per worker, the server's check, the run secret
under SLURM, and a store whose values only the run's processes can write."""

import hashlib
import hmac
import multiprocessing
import os
import stat

import pytest

from gorila_jax.wire import credentials, rendezvous
from gorila_jax.wire.credentials import WorkerAuthority
from gorila_jax.wire.transport import ProtocolError

SECRET = credentials.new_run_secret()


def test_a_credential_is_the_hmac_of_the_worker_under_the_secret():
    """Checked against hmac written out: each worker's differs, another run's differs, and
    nothing of the secret shows in it."""
    expected = hmac.new(bytes.fromhex(SECRET), b"gorila worker 3", hashlib.sha256).hexdigest()
    assert credentials.worker_credential(SECRET, 3) == expected
    ours = {credentials.worker_credential(SECRET, w) for w in range(50)}
    assert len(ours) == 50
    other = credentials.new_run_secret()
    assert credentials.worker_credential(other, 3) != expected
    assert SECRET not in ours and credentials.rendezvous_key(SECRET) not in ours


def header(worker, credential) -> dict:
    return {"kind": "hello", "worker": worker, "credential": credential}


def test_with_token_security_a_worker_is_only_who_holds_its_credential():
    authority = WorkerAuthority(3, secret=SECRET)
    for worker in range(3):
        authority.check(header(worker, credentials.worker_credential(SECRET, worker)))
    refusals = {
        "bad_credential": [
            header(1, credentials.worker_credential(SECRET, 0)),  # worker 0's, as worker 1
            header(0, credentials.worker_credential(credentials.new_run_secret(), 0)),
            header(0, ""),
            header(0, SECRET),  # the secret itself is no credential
        ],
        "bad_worker": [header(3, credentials.worker_credential(SECRET, 3)), header(-1, "")],
        "malformed": [header("0", ""), header(0, None), {"kind": "hello"}, header(True, "")],
    }
    for reason, headers in refusals.items():
        for refused in headers:
            with pytest.raises(ProtocolError) as caught:
                authority.check(refused)
            assert caught.value.reason == reason, refused
            assert not caught.value.authenticated


def test_with_curve_a_worker_is_the_key_its_connection_was_made_with():
    keys = {b"A" * 40: 0, b"B" * 40: 1}
    authority = WorkerAuthority(2, curve_workers=keys)
    authority.check(header(0, ""), "A" * 40)
    authority.check(header(1, "anything"), b"B" * 40)  # the header's credential is not used
    for worker, key in ((1, "A" * 40), (0, "B" * 40), (0, None), (0, "C" * 40)):
        with pytest.raises(ProtocolError, match="bad_credential"):
            authority.check(header(worker, credentials.worker_credential(SECRET, worker)), key)
    with pytest.raises(ValueError, match="not both"):
        WorkerAuthority(2, secret=SECRET, curve_workers=keys)


def test_signatures_bind_the_value_to_its_name_and_the_key():
    key = credentials.rendezvous_key(SECRET)
    signature = credentials.sign(key, "gorila/server_endpoint/0", "tcp://198.18.0.11:5555")
    assert credentials.signature_matches(
        key, "gorila/server_endpoint/0", "tcp://198.18.0.11:5555", signature
    )
    for name, value, signing_key in (
        ("gorila/server_endpoint/0", "tcp://198.18.0.99:5555", key),  # another value
        ("gorila/server_endpoint/1", "tcp://198.18.0.11:5555", key),  # under another name
        ("gorila/server_endpoint/0", "tcp://198.18.0.11:5555", SECRET),  # another key
    ):
        forged = credentials.sign(signing_key, name, value)
        assert not credentials.signature_matches(
            key, "gorila/server_endpoint/0", "tcp://198.18.0.11:5555", forged
        )


@pytest.mark.parametrize("secret", ["", "abc", "zz" * 32, "00" * 15])
def test_a_malformed_run_secret_is_refused_in_one_line(secret, tmp_path, monkeypatch):
    monkeypatch.setenv(credentials.ENV_RUN_SECRET, secret or " ")
    with pytest.raises(rendezvous.RendezvousError) as caught:
        rendezvous.slurm_run_secret(tmp_path)
    assert "GORILA_RUN_SECRET" in str(caught.value) and "\n" not in str(caught.value)


def test_under_slurm_the_secret_comes_from_the_environment_or_one_private_file(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(credentials.ENV_RUN_SECRET, SECRET)
    assert rendezvous.slurm_run_secret(tmp_path) == SECRET
    assert not (tmp_path / rendezvous.SECRET_FILE).exists()
    monkeypatch.delenv(credentials.ENV_RUN_SECRET)
    first = rendezvous.slurm_run_secret(tmp_path / "run")
    path = tmp_path / "run" / rendezvous.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rendezvous.slurm_run_secret(tmp_path / "run") == first != SECRET
    assert [p.name for p in path.parent.iterdir()] == [rendezvous.SECRET_FILE]  # no drafts


def _secret_of(run_dir: str, queue) -> None:
    queue.put(rendezvous.slurm_run_secret(run_dir))


def test_tasks_that_start_together_agree_on_one_secret(tmp_path, monkeypatch):
    """Eight processes racing to write RUN_DIR/run_secret all read the one that won."""
    monkeypatch.delenv(credentials.ENV_RUN_SECRET, raising=False)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_secret_of, args=(str(tmp_path), queue)) for _ in range(8)]
    for process in workers:
        process.start()
    secrets_read = {queue.get(timeout=60) for _ in workers}
    for process in workers:
        process.join(timeout=60)
    assert len(secrets_read) == 1
    assert secrets_read == {(tmp_path / rendezvous.SECRET_FILE).read_text().strip()}


class FakeStore:
    """jax.distributed's key-value client, as a dict: first write wins, as in jax."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, name, value):
        if name in self.values:
            raise RuntimeError(f"ALREADY_EXISTS: {name}")
        self.values[name] = value

    def blocking_key_value_get(self, name, timeout_ms):
        if name not in self.values:
            raise RuntimeError(f"DEADLINE_EXCEEDED: {name}")
        return self.values[name]


def store_of(client: FakeStore, key: str) -> rendezvous.StoreRendezvous:
    store = object.__new__(rendezvous.StoreRendezvous)
    store._client, store._key, store._timeout_ms = client, key, 1000
    store._context = "slurm job 7 step 0"
    return store


def test_the_store_carries_only_values_signed_with_the_runs_key(monkeypatch):
    """A shard's address and a bundle's CURVE key go through; a value planted by a
    process without the key (or of another run) is refused in one line naming the
    variable to set; a name taken first is an error, not a silent overwrite."""
    monkeypatch.delenv(rendezvous.ENV_PORT_FILE, raising=False)
    key = credentials.rendezvous_key(SECRET)
    client = FakeStore()
    shard, bundle = store_of(client, key), store_of(client, key)
    shard.publish_shard(0, rendezvous.ShardAddress("tcp://198.18.0.11:4000", b"K" * 40))
    assert bundle.shard_addresses(1, curve=True) == [
        rendezvous.ShardAddress("tcp://198.18.0.11:4000", b"K" * 40)
    ]
    assert bundle.exchange("host", 0, "h1", 1) == ["h1"]
    # A value written raw (no signature), or signed with another run's key.
    client.values[f"{rendezvous.KEY_BUNDLE_CURVE}1"] = "X" * 40
    other = store_of(client, credentials.rendezvous_key(credentials.new_run_secret()))
    other.publish_bundle_key(2, b"Y" * 40)
    for index in (1, 2):
        with pytest.raises(rendezvous.RendezvousError) as caught:
            shard.bundle_keys([index])
        assert "not signed with this run's key" in str(caught.value)
        assert "GORILA_RUN_SECRET" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(rendezvous.RendezvousError, match="another process wrote it first"):
        bundle.publish_bundle_key(1, b"Z" * 40)
    with pytest.raises(rendezvous.RendezvousError, match="nothing was published"):
        shard.bundle_keys([3])


def test_a_local_process_without_the_launchers_key_stops_in_one_line(monkeypatch, tmp_path):
    for name in (rendezvous.ENV_RENDEZVOUS_KEY, credentials.ENV_RUN_SECRET):
        monkeypatch.delenv(name, raising=False)
    info = rendezvous.ProcessInfo(1, 3, "local")
    with pytest.raises(rendezvous.RendezvousError, match="GORILA_RENDEZVOUS_KEY"):
        rendezvous.run_keys(info, tmp_path)
    monkeypatch.setenv(rendezvous.ENV_RENDEZVOUS_KEY, credentials.rendezvous_key(SECRET))
    monkeypatch.setenv(credentials.ENV_WORKER_CREDENTIAL, "c" * 64)
    keys = rendezvous.run_keys(info, tmp_path)
    assert keys.worker_credential(0) == "c" * 64 and keys.secret is None
    with pytest.raises(rendezvous.RendezvousError, match="no run secret"):
        keys.server_secret()
    assert os.environ[credentials.ENV_WORKER_CREDENTIAL] == "c" * 64


def test_a_secret_file_others_could_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(credentials.ENV_RUN_SECRET, raising=False)
    path = tmp_path / rendezvous.SECRET_FILE
    path.write_text(SECRET + "\n")
    path.chmod(0o644)
    with pytest.raises(rendezvous.RendezvousError, match="readable by others"):
        rendezvous.slurm_run_secret(tmp_path)
    path.chmod(0o600)
    assert rendezvous.slurm_run_secret(tmp_path) == SECRET


def test_a_value_signed_for_another_job_does_not_count(monkeypatch):
    """A secret used again (exported in a profile, or a run directory's file) must not let
    a value of an earlier job stand in this one's store."""
    monkeypatch.delenv(rendezvous.ENV_PORT_FILE, raising=False)
    key = credentials.rendezvous_key(SECRET)
    client = FakeStore()
    earlier = store_of(client, key)
    earlier._context = "slurm job 6 step 0"
    earlier.publish_shard(0, rendezvous.ShardAddress("tcp://198.18.0.11:4000", None))
    with pytest.raises(rendezvous.RendezvousError, match="not signed with this run's key"):
        store_of(client, key).shard_addresses(1, curve=False)
