"""Atomic writes: a reader sees the old file or the new one, never a part."""

import pytest

from gorila_jax.files import atomic_writer, write_atomically


def test_write_replaces_in_one_step_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "ps.json"
    write_atomically(path, "old")
    write_atomically(path, b"new", durable=True)
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["ps.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "params.msgpack"
    write_atomically(path, b"previous")
    with pytest.raises(OSError, match="disk full"), atomic_writer(path) as handle:
        handle.write(b"half of the new one")
        raise OSError("disk full")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["params.msgpack"]
