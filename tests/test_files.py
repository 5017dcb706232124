"""Atomic writes: a reader sees the old file or the new one, never a part."""

import pytest

from gorila_jax.io.files import atomic_writer, write_atomically


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


WRITER = """
import sys
from pathlib import Path
from gorila_jax.io.files import write_atomically
path = Path(sys.argv[1])
generation = 0
print("ready", flush=True)
while True:
    generation += 1
    # 4 MB of one repeated generation number: a torn file mixes two or is cut short.
    write_atomically(path, (b"%08d" % generation) * 500_000)
"""


def test_a_process_killed_in_the_middle_of_atomic_writes_leaves_a_whole_file(tmp_path):
    """Catches an atomic write that is not (written in place, or renamed before it is
    complete): a real process rewriting a 4 MB file as fast as it can is killed with
    SIGKILL at 8 random moments; after each kill the file holds one whole generation."""
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "ps.json"
    write_atomically(path, b"%08d" % 0 * 500_000)  # a whole file before the first kill
    rng = random.Random(0)
    for _ in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        data = path.read_bytes()
        assert len(data) == 4_000_000
        assert data == data[:8] * 500_000  # one generation throughout
