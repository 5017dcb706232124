"""Config: every bad value is refused with one line naming the field, before anything runs."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gorila_jax.core.config import (
    RESUME_SAFE_FIELDS,
    Config,
    ConfigError,
    cartpole_defaults,
    fingerprint,
    load_yaml,
    parse_cli,
    resume_differences,
    to_dict,
    validate,
)
from gorila_jax.io.config_file import write_resolved

ROOT = Path(__file__).resolve().parents[1]

BAD_VALUES = [
    ("replay_capacity", -5, "replay_capacity"),
    ("batch_size", 0, "batch_size"),
    ("num_envs", -1, "num_envs"),
    ("epsilon_start", 1.5, "epsilon_start"),
    ("epsilon_end", -0.1, "epsilon_end"),
    ("optimizer", "adamw", "optimizer"),
    ("gamma", 0.0, "gamma"),
    ("learning_rate", -1e-3, "learning_rate"),
    ("n_step", 0, "n_step"),
    ("gradient_part", "half", "gradient_part"),
    ("gradient_part", "1.5", "gradient_part"),
    ("env_id", "Pongg-v5", "env_id"),
    ("max_staleness", 0, "max_staleness"),
    ("max_message_mb", -1, "max_message_mb"),
    ("push_every", 0, "push_every"),
    ("learning_rate_end", 0.0, "learning_rate_end"),
    ("learning_rate_end", 1e-3, "learning_rate_end"),  # above the default 1e-4: a rise
    ("learning_rate_decay_start", -1, "learning_rate_decay_start"),
    ("learning_rate_decay_updates", -5, "learning_rate_decay_updates"),
]


@pytest.mark.parametrize(
    "settings",
    [
        {"single_process": True},
        {"mode": "sync", "workers": 2},
        {"wire_security": "curve"},
        {"gradient_part": "0.5"},
        {"max_bundles": 4},
    ],
)
def test_aggregate_per_host_is_refused_where_it_cannot_work(settings):
    """One line naming the field: a single process has no bundles to aggregate, a sync run
    no server, CURVE no credentials for it to check, a gradient part no whole gradient to
    sum, joins no aggregator to join."""
    with pytest.raises(ConfigError, match=r"^config\.aggregate_per_host: ") as refused:
        validate(dataclasses.replace(Config(), aggregate_per_host=True, **settings))
    assert "\n" not in str(refused.value)
    validate(dataclasses.replace(Config(), aggregate_per_host=True))


def test_push_every_is_refused_for_a_single_process():
    """Catches --push-every silently ignored where no gradient is pushed."""
    with pytest.raises(ConfigError, match=r"config\.push_every: applies to the bundles"):
        validate(dataclasses.replace(Config(), single_process=True, push_every=4))
    validate(dataclasses.replace(Config(), single_process=True, push_every=1))


@pytest.mark.parametrize(("field", "value", "named"), BAD_VALUES)
def test_bad_value_is_refused_naming_the_field(field, value, named):
    config = dataclasses.replace(Config(), **{field: value})
    with pytest.raises(ConfigError) as error:
        validate(config)
    message = str(error.value)
    assert f"config.{named}" in message and "\n" not in message


def test_unknown_env_says_how_to_list_ids():
    with pytest.raises(ConfigError, match=r"python -m gorila_jax\.envs"):
        validate(dataclasses.replace(Config(), env_id="NoSuchGame-v5"))


def test_batch_must_divide_over_devices():
    with pytest.raises(ConfigError, match=r"config.batch_size: must be divisible.*\(4\)"):
        validate(dataclasses.replace(Config(), batch_size=30), local_device_count=4)
    validate(dataclasses.replace(Config(), batch_size=32), local_device_count=4)


def test_defaults_are_valid():
    validate(Config())
    validate(cartpole_defaults())


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"batch_size": 64, "learning_rate": 0.001, "dueling": True}))
    config = parse_cli(Config(), ["--config", str(path), "--batch-size", "16"])
    assert config.batch_size == 16 and config.learning_rate == 0.001 and config.dueling


def test_yaml_unknown_field_and_bad_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_yaml(path, Config())
    path.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"config\.batch_size: must be a number"):
        load_yaml(path, Config())


def test_resolved_config_round_trips(tmp_path):
    config = dataclasses.replace(cartpole_defaults(), mlp_hidden=(32, 16), gradient_part="0.5")
    path = write_resolved(config, tmp_path)
    assert load_yaml(path, Config()) == config
    assert yaml.safe_load(path.read_text()) == to_dict(config)


def test_every_config_a_run_directory_was_trained_with_is_kept(tmp_path):
    first = cartpole_defaults()
    write_resolved(first, tmp_path)
    write_resolved(first, tmp_path)  # the same config again: nothing to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    second = dataclasses.replace(first, total_frames=90_000)
    third = dataclasses.replace(first, learning_rate=0.5)
    write_resolved(second, tmp_path)
    write_resolved(third, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.1.yaml",
        "config.2.yaml",
        "config.yaml",
    ]
    for name, config in (("config.1.yaml", first), ("config.2.yaml", second)):
        assert load_yaml(tmp_path / name, Config()) == config
    assert load_yaml(tmp_path / "config.yaml", Config()) == third  # the latest


# Pinned by hand: adding a field here lets a resumed run change it without --force-resume,
# so the set may only change together with this test (moving `optimizer` here must fail).
EXPECTED_RESUME_SAFE_FIELDS = {
    "total_frames", "run_dir", "resume", "force_resume", "max_restarts", "log_every_seconds",
    "stats_every_seconds", "checkpoint_every_updates", "checkpoint_every_seconds",
    "checkpoint_keep", "checkpoint_replay", "server_timeout_seconds", "server_retry_seconds",
    "max_message_mb", "wire_security", "max_bundles", "join",
}  # fmt: skip


def test_resume_safe_fields_are_exactly_the_pinned_set():
    """Catches a training setting (optimizer, learning rate, network...) made resume-safe,
    so that a checkpoint would be continued under other training settings without a word,
    and a resume-safe field dropped (a longer run would then need --force-resume)."""
    assert len(RESUME_SAFE_FIELDS) == len(set(RESUME_SAFE_FIELDS))
    assert set(RESUME_SAFE_FIELDS) == EXPECTED_RESUME_SAFE_FIELDS
    assert {field.name for field in dataclasses.fields(Config)} >= EXPECTED_RESUME_SAFE_FIELDS


def another_value(value):
    """A value of the same kind that differs from `value` (the fingerprint does not
    validate, so a string need not be a valid choice)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2.0 + 0.5
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, tuple):
        return (*value, 7)
    raise AssertionError(f"no other value for {value!r}: extend another_value")


def test_the_fingerprint_covers_every_training_setting_and_nothing_else():
    """Every field of Config, one at a time: a training setting changes the fingerprint and
    is named by resume_differences; a resume-safe one changes neither. Catches a field left
    out of the fingerprint (a new field in `to_dict` or `training_settings` forgotten, or
    dropped by a filter), and a resume-safe field that still refuses a resume."""
    base = cartpole_defaults()
    names = [field.name for field in dataclasses.fields(Config)]
    assert len(names) >= 40  # every field, not a hand-picked few
    for name in names:
        value = another_value(getattr(base, name))
        other = dataclasses.replace(base, **{name: value})
        shown = list(value) if name == "mlp_hidden" else value  # to_dict's YAML-able list
        before = to_dict(base)[name]
        if name in EXPECTED_RESUME_SAFE_FIELDS:
            assert fingerprint(other) == fingerprint(base), name
            assert resume_differences(to_dict(base), other) == [], name
        else:
            assert fingerprint(other) != fingerprint(base), name
            assert resume_differences(to_dict(base), other) == [f"{name} {before!r} -> {shown!r}"]
    safe = dataclasses.replace(
        base, total_frames=1, run_dir="elsewhere", log_every_seconds=99.0, checkpoint_keep=9,
        stats_every_seconds=9.0, resume=True, force_resume=True, max_message_mb=4,
    )  # fmt: skip
    assert fingerprint(safe) == fingerprint(base)
    assert resume_differences(to_dict(base), safe) == []
    # A config saved before a field existed compares it with the field's default.
    saved = to_dict(base)
    del saved["outlier_k"]
    assert resume_differences(saved, base) == []
    assert resume_differences(saved, dataclasses.replace(base, outlier_k=1.0)) == [
        "outlier_k 6.0 -> 1.0"
    ]


def test_cli_prints_one_line_and_exits_2():
    result = subprocess.run(
        [sys.executable, "experiments/cartpole.py", "--epsilon-start", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: config.epsilon_start: must be in [0, 1], got 2.0"]


def test_replay_that_cannot_fit_is_refused_before_training(tmp_path):
    """Catches a refusal that comes after the run has started writing (the run directory
    made first, then the replay found too large for the machine)."""
    run_dir = tmp_path / "never-written"
    result = subprocess.run(
        [
            sys.executable,
            "experiments/pong.py",
            "--single-process",
            "--replay-capacity",
            "100000000000",
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: replay needs")
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--optimizer", "adamw"], "invalid choice 'adamw' for argument '--optimizer'"),
        (["--batch-size", "abc"], "Error parsing --batch-size"),
        (["--no-such-flag", "1"], "Unrecognized options: --no-such-flag"),
    ],
)
def test_parse_errors_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_cli(cartpole_defaults(), args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_the_readme_names_every_setting_safe_to_change_on_a_resume():
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("**only if the training settings match**") :]
    paragraph = paragraph[: paragraph.index("config.RESUME_SAFE_FIELDS")]
    named = set(re.findall(r"`(\w+)`", paragraph))
    missing = [
        field
        for field in RESUME_SAFE_FIELDS
        if field not in named
        and not (field.startswith("checkpoint_") and "checkpoint_*" in paragraph)
    ]
    assert missing == []


def test_a_renamed_field_reads_under_its_new_name_and_says_so(caplog):
    """shard_factor (before protocol 3) is gradient_part now: a config file or a
    checkpoint's saved config with the old name means the same setting, with one warning
    line; nothing reads it differently without a word."""
    import logging

    from gorila_jax.core.config import from_dict

    with caplog.at_level(logging.WARNING):
        config = from_dict({"shard_factor": "default"}, cartpole_defaults())
    assert config.gradient_part == "default"
    assert [r.getMessage() for r in caplog.records] == [
        "config field shard_factor is called gradient_part now; read as gradient_part"
    ]
    saved = to_dict(cartpole_defaults())
    saved["shard_factor"] = saved.pop("gradient_part")
    assert resume_differences(saved, cartpole_defaults()) == []
    saved["shard_factor"] = "0.5"
    assert resume_differences(saved, cartpole_defaults()) == ["gradient_part '0.5' -> 'all'"]


def test_both_names_of_a_renamed_field_must_agree():
    from gorila_jax.core.config import from_dict

    with pytest.raises(ConfigError, match=r"shard_factor .* and gradient_part disagree"):
        from_dict({"shard_factor": "default", "gradient_part": "all"}, cartpole_defaults())
    both = from_dict({"shard_factor": "0.5", "gradient_part": "0.5"}, cartpole_defaults())
    assert both.gradient_part == "0.5"


def test_a_run_saved_before_the_learning_rate_could_decay_reads_as_constant():
    """A checkpoint's config from before the decay fields kept its learning rate constant:
    compared with today's defaults (a decay) the resume names the change; with the decay
    off it is the same run. Catches an old run resumed into a decay without a word (the
    missing field read as today's default)."""
    saved = to_dict(Config())
    for name in ("learning_rate_end", "learning_rate_decay_start", "learning_rate_decay_updates"):
        del saved[name]
    assert resume_differences(saved, Config()) == ["learning_rate_decay_updates 0 -> 150000"]
    constant = dataclasses.replace(Config(), learning_rate_decay_updates=0)
    assert resume_differences(saved, constant) == []


def test_a_config_yaml_from_before_the_decay_loads_as_it_trained(tmp_path):
    """evaluate.py reads a run's config.yaml: one written before the decay fields, trained
    at a rate below today's decay end, loads with the decay off (as it trained) and
    validates; with today's defaults filled in instead, it would be refused."""
    from gorila_jax.core.config import load_run_yaml

    saved = to_dict(dataclasses.replace(Config(), learning_rate=1e-5))
    for name in ("learning_rate_end", "learning_rate_decay_start", "learning_rate_decay_updates"):
        del saved[name]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    loaded = validate(load_run_yaml(path))
    assert loaded.learning_rate == 1e-5 and loaded.learning_rate_decay_updates == 0
    with pytest.raises(ConfigError, match="--learning-rate-decay-updates 0"):
        validate(load_yaml(path, Config()))
