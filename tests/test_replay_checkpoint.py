"""Replay checkpoints: exact round trip, same next sample, damaged and foreign files refused."""

import dataclasses
import errno
import logging
import zipfile

import jax
import numpy as np
import pytest

from gorila_jax.bundle.loop import LoopCounters
from gorila_jax.bundle.replay_checkpoint import (
    ReplayCheckpointer,
    replay_dir,
    replay_fingerprint,
    restore_replay,
)
from gorila_jax.core.config import Config, cartpole_defaults
from gorila_jax.core.replay import PrioritizedReplay, Replay

FRAME_SHAPE = (6, 5)
NUM_ENVS = 3


def make(prioritized: bool, seed: int = 0) -> Replay:
    common = dict(
        capacity=60,
        num_envs=NUM_ENVS,
        frame_shape=FRAME_SHAPE,
        frame_dtype=np.uint8,
        stack_size=4,
        n_step=3,
        gamma=0.9,
        num_actions=5,
        seed=seed,
    )
    if prioritized:
        return PrioritizedReplay(**common, alpha=0.7, beta_steps=100)
    return Replay(**common)


def fill(replay: Replay, adds: int, seed: int) -> None:
    """Random frames, actions and rewards; episodes end at random (terminated or truncated)."""
    rng = np.random.default_rng(seed)
    first = np.ones(NUM_ENVS, dtype=bool)
    for _ in range(adds):
        terminated = rng.random(NUM_ENVS) < 0.08
        truncated = ~terminated & (rng.random(NUM_ENVS) < 0.03)
        replay.add(
            rng.integers(0, 256, (NUM_ENVS, *FRAME_SHAPE), dtype=np.uint8),
            rng.integers(0, 5, NUM_ENVS),
            rng.normal(size=NUM_ENVS),
            terminated,
            truncated,
            first,
        )
        first = terminated | truncated
        if replay.prioritized and replay.can_sample(8):
            sample = replay.sample(8)
            replay.update_priorities(sample.indices, rng.normal(size=8))


def at(frames: int) -> LoopCounters:
    """Counters of a checkpoint made at `frames`."""
    return LoopCounters(frames, frames // 4, frames // 100, (7, frames))


def checkpointer(tmp_path, **expect) -> ReplayCheckpointer:
    return ReplayCheckpointer(tmp_path / "replay", keep=2, expect=expect or {"bundle": 1})


def assert_same_state(a: Replay, b: Replay) -> None:
    arrays_a, scalars_a = a.state()
    arrays_b, scalars_b = b.state()
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert scalars_a == scalars_b
    assert len(a) == len(b)


@pytest.mark.parametrize("prioritized", [False, True])
@pytest.mark.parametrize("adds", [7, 23, 95])  # before the first sample, before and after wrap
def test_round_trip_is_exact_and_draws_the_same_next_sample(tmp_path, prioritized, adds):
    original = make(prioritized)
    fill(original, adds, seed=adds)
    saver = checkpointer(tmp_path)
    path = saver.save(original, at(1234), {"updates": 9})
    assert path is not None and path.exists()

    restored = make(prioritized, seed=99)  # another seed: the RNG state must come from disk
    result = saver.restore(restored)
    assert result is not None and result.frames == 1234 and result.counters == at(1234)
    assert result.extra == {"updates": 9}
    assert_same_state(original, restored)
    restored.check_valid()
    if prioritized:
        np.testing.assert_array_equal(
            original.priorities(np.arange(original.capacity)),
            restored.priorities(np.arange(restored.capacity)),
        )
        assert original.beta == restored.beta
    if original.can_sample(8):
        for _ in range(3):
            expected, got = original.sample(8), restored.sample(8)
            np.testing.assert_array_equal(expected.indices, got.indices)
            np.testing.assert_array_equal(expected.weights, got.weights)
            for field in expected.transition._fields:
                np.testing.assert_array_equal(
                    getattr(expected.transition, field), getattr(got.transition, field)
                )
    # Both go on identically after the restore.
    fill(original, 5, seed=7)
    fill(restored, 5, seed=7)
    assert_same_state(original, restored)


def test_only_the_last_k_are_kept_and_the_newest_is_restored(tmp_path):
    replay = make(False)
    saver = checkpointer(tmp_path)
    for frames in (10, 20, 30):
        fill(replay, 4, seed=frames)
        saver.save(replay, at(frames))
    assert [p.name for p in saver.checkpoints()] == [
        "replay-000000000020.zip",
        "replay-000000000030.zip",
    ]
    fresh = make(False)
    assert saver.restore(fresh).counters == at(30)
    assert_same_state(replay, fresh)


def warnings_of(caplog) -> list[str]:
    """The warning messages logged since the last call (then forgotten)."""
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    return messages


def test_a_damaged_newest_file_falls_back_to_the_previous_one(tmp_path, caplog):
    replay = make(True)
    saver = checkpointer(tmp_path)
    fill(replay, 30, seed=1)
    saver.save(replay, at(1))
    kept = make(True)
    kept.load_state(*replay.state())
    fill(replay, 30, seed=2)
    newest = saver.save(replay, at(2))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: a CRC error
    newest.write_bytes(bytes(data))

    fresh = make(True)
    assert saver.restore(fresh).counters == at(1)
    assert_same_state(kept, fresh)
    (warning,) = warnings_of(caplog)  # one line
    assert "replay-000000000002.zip is damaged" in warning and "\n" not in warning
    assert "moved to" in warning and (saver.directory / "refused" / newest.name).exists()
    assert [p.name for p in saver.checkpoints()] == ["replay-000000000001.zip"]


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not a zip", "no meta", "bad shape", "bad flags", "pickled array"],
)
def test_every_damaged_file_is_refused_with_one_line_and_leaves_an_empty_replay(
    tmp_path, caplog, damage
):
    replay = make(True)
    fill(replay, 30, seed=1)
    saver = checkpointer(tmp_path)
    path = saver.save(replay, at(5))
    arrays, scalars = replay.state()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "not a zip":
        path.write_bytes(b"hello")
    else:
        import json

        members = {
            "meta.json": json.dumps(
                {"expect": saver.expect, "replay": scalars, "counters": at(5).to_dict()}
            )
        }
        if damage == "no meta":
            members.pop("meta.json")
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in members.items():
                archive.writestr(name, text)
            for name, array in arrays.items():
                if damage == "bad shape" and name == "frames":
                    array = array[:-1]
                if damage == "bad flags" and name == "flags":
                    array = array | np.uint8(64)
                if damage == "pickled array" and name == "actions":
                    array = np.array([object()] * len(array), dtype=object)
                with archive.open(f"{name}.npy", "w") as member:
                    np.lib.format.write_array(member, array, allow_pickle=True)
    fresh = make(True)
    fill(fresh, 3, seed=3)  # whatever it held before is forgotten or kept consistent
    assert saver.restore(fresh) is None
    warnings = warnings_of(caplog)
    assert any("is damaged" in line for line in warnings), warnings
    assert not any("\n" in line for line in warnings), warnings  # no traceback
    assert not any(record.exc_info for record in caplog.records)
    fresh.check_valid()


def test_a_checkpoint_of_another_config_or_bundle_count_is_refused(tmp_path, caplog):
    config = cartpole_defaults()
    replay = make(False)
    fill(replay, 20, seed=1)
    expect = {"replay_fingerprint": replay_fingerprint(config), "bundles": 2, "bundle": 1}
    ReplayCheckpointer(tmp_path, keep=2, expect=expect).save(replay, at(3))

    other_count = ReplayCheckpointer(tmp_path, keep=2, expect={**expect, "bundles": 3})
    fresh = make(False)
    assert other_count.restore(fresh) is None and len(fresh) == 0
    assert "made for another run (bundles differ)" in " ".join(warnings_of(caplog))
    ReplayCheckpointer(tmp_path, keep=2, expect=expect).save(replay, at(3))  # set aside: again

    other_config = dataclasses.replace(config, n_step=5)
    assert replay_fingerprint(other_config) != replay_fingerprint(config)
    assert replay_fingerprint(dataclasses.replace(config, learning_rate=1.0)) == (
        replay_fingerprint(config)
    )
    foreign = {**expect, "replay_fingerprint": replay_fingerprint(other_config)}
    assert ReplayCheckpointer(tmp_path, keep=2, expect=foreign).restore(fresh) is None
    assert "replay_fingerprint differ" in " ".join(warnings_of(caplog))


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, caplog, monkeypatch):
    replay = make(False)
    fill(replay, 20, seed=1)
    saver = checkpointer(tmp_path)
    first = saver.save(replay, at(1))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", no_space)
    assert saver.save(replay, at(2)) is None
    (warning,) = warnings_of(caplog)
    assert "replay-000000000002.zip not written" in warning and "No space left" in warning
    assert "previous one is kept (replay-000000000001.zip)" in warning
    assert saver.checkpoints() == [first]
    assert not list(saver.directory.glob("*.tmp"))
    monkeypatch.undo()
    assert saver.restore(make(False)).counters == at(1)


def test_a_bundle_whose_replay_is_lost_starts_empty_while_the_other_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gorila_jax")
    config = dataclasses.replace(Config(), run_dir=str(tmp_path), num_envs=NUM_ENVS)
    counters = LoopCounters(400, 100, 3, (1, 2))
    for bundle in (1, 2):
        saver, resume = restore_replay(config, make(False), bundle=bundle, bundles=2)
        assert resume is None
        replay = make(False)
        fill(replay, 20, seed=bundle)
        saver.save(replay, counters)
    for path in replay_dir(tmp_path, 2).iterdir():
        path.unlink()  # bundle 2's checkpoints are lost
    caplog.clear()
    _, resume_1 = restore_replay(config, make(False), bundle=1, bundles=2)
    assert resume_1 == LoopCounters(400, 100, 3, (1, 2))
    (resumed,) = caplog.records  # bundle 2 has nothing to resume: not a word
    assert resumed.levelno == logging.INFO
    assert resumed.getMessage().startswith("resumed its replay from replay-000000000400.zip: ")
    assert resumed.getMessage().endswith(" transitions, 400 frames, 3 episodes")
    replay_2 = make(False)
    _, resume_2 = restore_replay(config, replay_2, bundle=2, bundles=2)
    assert resume_2 is None and len(replay_2) == 0
    assert len(caplog.records) == 1
    off = dataclasses.replace(config, checkpoint_replay=False)
    assert restore_replay(off, make(False), bundle=1, bundles=2) == (None, None)


def test_loop_counters_round_trip_the_policy_key():
    key = jax.random.split(jax.random.key(5))[1]
    data = tuple(int(v) for v in np.asarray(jax.random.key_data(key)))
    counters = LoopCounters.from_dict(LoopCounters(8, 2, 1, data).to_dict())
    again = jax.random.wrap_key_data(np.asarray(counters.policy_key, dtype=np.uint32))
    np.testing.assert_array_equal(jax.random.uniform(again, (3,)), jax.random.uniform(key, (3,)))


def test_no_byte_of_damage_crashes_a_restore_or_leaves_a_half_loaded_replay(tmp_path):
    """Every single-byte corruption of a checkpoint is either refused (replay empty) or
    harmless (identical restore): never an exception out of restore."""
    replay = make(True)
    fill(replay, 30, seed=1)
    saver = checkpointer(tmp_path)
    path = saver.save(replay, at(5))
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    positions = rng.choice(len(original), size=min(300, len(original)), replace=False)
    outcomes = set()
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        saver.directory.mkdir(exist_ok=True)
        path.write_bytes(bytes(damaged))
        fresh = make(True)
        restored = saver.restore(fresh)
        fresh.check_valid()
        if restored is None:
            assert len(fresh) == 0 and fresh.num_adds == 0
            outcomes.add("refused")
        else:
            assert_same_state(replay, fresh)
            outcomes.add("restored")
        for moved in (saver.directory / "refused").glob("*"):
            moved.unlink()
    assert "refused" in outcomes


def write_members(path, members: dict) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_crafted_files_are_refused_without_allocating_what_they_claim(tmp_path, caplog):
    import io
    import json

    replay = make(False)
    fill(replay, 20, seed=1)
    saver = checkpointer(tmp_path)
    path = saver.save(replay, at(5))
    arrays, scalars = replay.state()
    good_meta = {"expect": saver.expect, "replay": scalars, "counters": at(5).to_dict()}

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    huge_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        huge_header, {"descr": "|u1", "fortran_order": False, "shape": (2 * 10**12,)}
    )
    cases = {
        "huge shape": {"frames.npy": huge_header.getvalue()},
        "replay not a mapping": {"meta": {**good_meta, "replay": []}},
        "expect not a mapping": {"meta": {**good_meta, "expect": [1]}},
        "deep json": {"meta_text": "[" * 100_000 + "]" * 100_000},
        "num_adds huge": {"meta": {**good_meta, "replay": {**scalars, "num_adds": 2**70}}},
        "frames infinite": {"meta_text": json.dumps(good_meta).replace(
            '"frames": 5', '"frames": Infinity')},
        "short key": {"meta": {**good_meta, "counters": {**at(5).to_dict(),
                                                          "policy_key": [1, 2, 3]}}},
    }  # fmt: skip
    for case, change in cases.items():
        members = {
            "meta.json": change.get("meta_text") or json.dumps(change.get("meta", good_meta))
        }
        for name, array in arrays.items():
            members[f"{name}.npy"] = change.get(f"{name}.npy", npy(array))
        write_members(path, members)
        fresh = make(False)
        assert saver.restore(fresh) is None, case
        assert fresh.num_adds == 0 and len(fresh) == 0, case
        assert not any(record.exc_info for record in caplog.records), case
        warnings = " ".join(warnings_of(caplog))
        assert "Traceback" not in warnings, case
        if case == "huge shape":  # refused from its header, before any allocation
            assert "frames.npy holds (2000000000000,) uint8, expected" in warnings
        for moved in (saver.directory / "refused").glob("*"):
            moved.unlink()


def test_refused_files_never_shadow_new_saves(tmp_path):
    """Checkpoints of another run at higher frames are set aside, so keep-K never deletes
    the file just written and the next restore finds the new run's own."""
    replay = make(False)
    fill(replay, 20, seed=1)
    other = ReplayCheckpointer(tmp_path, keep=2, expect={"bundle": 9})
    other.save(replay, at(200))
    other.save(replay, at(300))
    saver = ReplayCheckpointer(tmp_path, keep=2, expect={"bundle": 1})
    assert saver.restore(make(False)) is None
    assert saver.checkpoints() == []
    assert len(list((tmp_path / "refused").iterdir())) == 2
    written = saver.save(replay, at(50))
    assert written.exists() and saver.checkpoints() == [written]
    assert saver.restore(make(False)).counters == at(50)


def test_leftover_temporary_files_are_removed(tmp_path):
    replay = make(False)
    fill(replay, 20, seed=1)
    saver = checkpointer(tmp_path)
    saver.save(replay, at(5))
    leftover = saver.directory / "replay-000000000009.zip.4242.tmp"
    leftover.write_bytes(b"half a file")
    assert saver.restore(make(False)).counters == at(5)
    assert not leftover.exists()


def test_a_single_process_replay_pairs_with_its_learner_by_frames(tmp_path, caplog):
    replay = make(False)
    saver = checkpointer(tmp_path)
    for frames in (10, 20, 30):
        fill(replay, 4, seed=frames)
        saver.save(replay, at(frames))
    saver.keep = 5
    fresh = make(False)
    assert saver.restore(fresh, frames=20).counters == at(20)  # 30 is newer than the learner
    assert "newer than the learner's checkpoint" in " ".join(warnings_of(caplog))
    assert saver.restore(make(False), frames=15) is None  # no replay was saved at 15
    assert saver.restore(make(False), frames=0) is None  # no learner: no replay either


def test_bad_loop_counters_are_refused():
    good = at(8).to_dict()
    for bad in (
        {"frames": 1},
        {**good, "frames": -1},
        {**good, "frames": float("inf")},
        {**good, "policy_key": [1, 2, 3]},
        {**good, "policy_key": [1, 2**32]},
        {**good, "episodes": "many"},
    ):
        with pytest.raises(ValueError, match="bad loop counters"):
            LoopCounters.from_dict(bad)
