"""The one typed configuration of a run, its validation, YAML loading and CLI parsing.

Every setting of a run lives in :class:`Config`; each field is documented where it is
declared, and tyro turns those docstrings into ``--help``. A YAML file (``--config FILE``)
gives a base that command-line flags override. :func:`validate` refuses a bad value with a
one-line :class:`ConfigError` naming the field and the rule, before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import yaml

from gorila_jax.core.cli import CommandLineError, fail, parse
from gorila_jax.core.env_ids import CARTPOLE_IDS, atari_env_ids, stack_size
from gorila_jax.core.replay import Replay

Optimizer = Literal["adam", "rmsprop", "sgd", "adagrad"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Gorila DQN: a parameter server and actor-learner bundles (or one process)."""

    # --- run -------------------------------------------------------------------------
    env_id: str = "Pong-v5"
    """Environment: an envpool Atari id (e.g. Pong-v5, Breakout-v5) or CartPole-v1."""
    total_frames: int = 2_000_000
    """Environment frames to train for, summed over all envs of all bundles (Atari: 4 per
    agent step because of frame skip)."""
    run_dir: str = "runs/pong"
    """Directory for the resolved config, logs, metrics and saved params."""
    seed: int = 0
    """Seed of everything; bundle i uses seed + i."""
    single_process: bool = False
    """Train in this one process (actors, replay and learner together, no parameter
    server) instead of the distributed Gorila layout."""
    workers: int = 2
    """Local runs without SLURM: number of bundle processes started beside the server (in
    sync mode, the number of processes)."""
    mode: Literal["gorila", "sync"] = "gorila"
    """How the bundles learn together: "gorila", they push gradients to a parameter server,
    which applies them as they come (asynchronous); "sync", there is no server, and every
    learner step averages the gradients of all the processes (each a bundle) with jax's
    multi-process collectives and applies the same update everywhere (synchronous data
    parallelism: the params stay identical). See the README's "Synchronous mode"."""

    # --- environment -----------------------------------------------------------------
    num_envs: int = 8
    """Environments stepped together by each bundle's actor (envpool batch size)."""
    noop_max: int = 30
    """Atari: up to this many no-op actions at the start of each episode."""
    episodic_life: bool = True
    """Atari training: a lost life ends the episode for bootstrapping (not for logging)."""
    reward_clip: bool = True
    """Atari training: clip rewards to their sign."""
    sticky_action_prob: float = 0.0
    """Atari: probability of repeating the previous action (0 = no sticky actions)."""
    max_episode_frames: int = 108_000
    """Atari: truncate an episode after this many frames (27,000 agent steps)."""

    # --- network ---------------------------------------------------------------------
    dueling: bool = False
    """Use a dueling head (value + advantage streams)."""
    mlp_hidden: tuple[int, ...] = (128, 128)
    """Hidden layer widths of the MLP used for vector observations (CartPole)."""

    # --- learning --------------------------------------------------------------------
    double_dqn: bool = False
    """Double DQN targets (online net picks the next action, target net evaluates it)."""
    n_step: int = 3
    """Steps of reward summed before bootstrapping (1 = the classic DQN target). 3, with
    replay_capacity 100,000: at 2 and 50,000 the seed-1 Pong run evaluated at 17.80 and
    17.60 at 2M and 2.5M frames (docs/pong-seed1/attempt-8), seed 0 at +18 only at 3.17M,
    and n-step returns are what make a larger replay pay off (Fedus et al. 2020)."""
    gamma: float = 0.99
    """Discount factor per agent step."""
    batch_size: int = 32
    """Transitions per learner step; split across the process's local devices."""
    optimizer: Optimizer = "adam"
    """Optimizer (applied by the parameter server, or locally in single-process mode)."""
    learning_rate: float = 1e-4
    """Optimizer step size (at the start: see learning_rate_decay_updates)."""
    learning_rate_end: float = 2.5e-5
    """The step size the learning rate falls to, linearly over learning_rate_decay_updates
    optimizer updates from update learning_rate_decay_start on, and keeps after."""
    learning_rate_decay_start: int = 250_000
    """Optimizer updates (server updates when distributed, as target_period counts them)
    at the full learning_rate before it starts to fall. With the Pong defaults a run
    makes about one update per 4 frames: 250,000 updates are about 1M frames."""
    learning_rate_decay_updates: int = 150_000
    """Optimizer updates over which the learning rate falls from learning_rate to
    learning_rate_end (150,000: to about 1.6M frames with the Pong defaults); 0 keeps
    learning_rate throughout. A run resumes only with the decay on or off as it was
    trained (the optimizer's state holds an update count only with it on)."""
    optimizer_eps: float = 1.5e-4
    """Epsilon of adam / rmsprop / adagrad. 1.5e-4 (Rainbow's and Dopamine's Adam epsilon,
    not optax's 1e-8): most of the Nature CNN's gradients are below 1e-5 per parameter, and
    with 1e-8 Adam moves each of those whose gradient keeps its sign by about a full
    learning rate per update; on Pong, with gradients 4 to 15 updates stale, that killed the
    network's units within the first 10,000 updates in 4 of 6 fresh seed-1 runs
    (docs/pong-seed1/attempt-5)."""
    max_grad_norm: float = 10.0
    """Clip gradients to this global norm (0 disables clipping)."""
    huber_delta: float = 1.0
    """Huber loss threshold on the TD error."""
    train_every: int = 1
    """Agent steps (summed over all envs of a bundle) per learner step."""
    learning_starts: int = 20_000
    """Frames collected by a bundle before its learner starts."""
    target_period: int = 1_000
    """Refresh the target network every this many updates (server updates when
    distributed, as in the Gorila paper)."""

    # --- replay ----------------------------------------------------------------------
    replay_capacity: int = 100_000
    """Transitions held by each bundle's replay memory (100,000 Pong frames: about 0.7 GB)."""
    prioritized: bool = False
    """Proportional prioritized replay instead of uniform sampling."""
    priority_alpha: float = 0.6
    """Prioritized replay: priority exponent."""
    priority_beta_start: float = 0.4
    """Prioritized replay: importance-weight exponent at the start, annealed to 1."""
    priority_eps: float = 1e-6
    """Prioritized replay: added to |TD error| so no transition gets priority 0."""

    # --- exploration -----------------------------------------------------------------
    epsilon_start: float = 1.0
    """Epsilon-greedy: exploration rate at frame 0."""
    epsilon_end: float = 0.05
    """Epsilon-greedy: exploration rate after the decay (0.05: the Nature DQN's evaluation
    epsilon, so the policy is trained to be robust to the random actions it is judged under)."""
    epsilon_decay_frames: int = 400_000
    """Epsilon-greedy: frames over which epsilon falls linearly from start to end."""

    # --- parameter server (distributed runs) --------------------------------------------
    server_shards: int = 1
    """Parameter-server processes, each owning a contiguous slice of the parameters (as in
    the Gorila paper). Under SLURM tasks 0..S-1 are the shards and the rest bundles; the
    local launcher starts S shards and `workers` bundles. A run resumes only with the same
    number of shards."""
    sync_every: int = 4
    """Bundles pull fresh params from the server every this many learner steps."""
    push_every: int = 1
    """Bundles push the mean of this many learner steps' gradients at once: a K-times
    larger effective batch (the gradient of K batches together) and K times fewer pushes
    for every server shard to absorb. 1 pushes every gradient."""
    aggregate_per_host: bool = False
    """One aggregator process per host (`gorila_jax.aggregator`): the host's bundles push to
    it and pull from it, and it forwards the mean of what they pushed since its last
    forward to every shard, one push per shard at a time, so each shard receives one push
    per host instead of one per bundle. The local launcher starts one more process for
    it; under SLURM the first task on each node after the shards is its aggregator. Needs
    token wire security and gradient_part all; no --join."""
    max_staleness: int = 64
    """The server rejects gradients computed on params more than this many versions old."""
    outlier_k: float = 6.0
    """The server drops a push whose mean |TD error| exceeds the median of the last 512
    pushes plus this many robust standard deviations (1.4826 x their median absolute
    deviation), so one huge loss cannot disable the filter (0 disables it)."""
    outlier_warmup: int = 50
    """Pushes seen before the outlier filter starts judging."""
    gradient_part: str = "all"
    """The part of the gradient each bundle pushes (the paper's gradient sharding): "all"
    (the whole gradient), "default" (each of W bundles owns 1/W of the parameters, picked
    by a fixed random permutation) or a fraction in (0, 1] of the parameters per bundle.
    Called shard_factor before; a config file or checkpoint with that name still reads."""
    dc_asgd: Literal["off", "constant", "adaptive"] = "off"
    """Delay compensation (DC-ASGD, Zheng et al. 2017) chained before the server's optimizer."""
    dc_asgd_lambda: float = -1.0
    """DC-ASGD lambda; negative picks the paper's default (0.04 constant, 2.0 adaptive)."""
    max_message_mb: int = 0
    """Largest message the sockets accept, in MiB; 0 sizes it from the model: the
    parameter vector plus a header, plus one header of headroom (6.9 MB for the Nature
    CNN)."""
    stats_every_seconds: float = 2.0
    """Seconds between writes of RUN_DIR/ps.json by the server."""
    server_timeout_seconds: float = 30.0
    """How long a bundle waits for one reply from the server before it counts it lost."""
    server_retry_seconds: float = 300.0
    """How long a bundle that lost the server keeps reconnecting (with backoff) before it
    exits with an error; also how long it says hello again to a server that has not
    answered its first hello yet (still starting)."""
    wire_security: Literal["token", "curve"] = "token"
    """Distributed runs: "token", each request carries its worker's credential (derived
    from the run secret) and all traffic is in clear;
    "curve", zmq CURVE also encrypts and authenticates every connection (a key pair per
    process and run, public keys exchanged through the jax.distributed store or the local
    launcher), at a cost: a Nature CNN push + pull round trip took 32 ms instead of 16 ms
    on the 2-core development machine (see the README's threat model)."""

    # --- checkpoints and failures ------------------------------------------------------
    checkpoint_every_updates: int = 5_000
    """The server checkpoints its whole state every this many updates..."""
    checkpoint_every_seconds: float = 300.0
    """...and every this many seconds, and at shutdown (SIGTERM, SIGINT, end of run); bundles
    (their replay) and a single process (its learner and replay) every this many seconds
    and at shutdown."""
    checkpoint_keep: int = 3
    """Checkpoints kept in RUN_DIR/checkpoints (older ones are deleted), and replay
    checkpoints kept per bundle in RUN_DIR/replay."""
    checkpoint_replay: bool = True
    """Each bundle (and a single process) also checkpoints its replay memory and counters
    (compressed, every checkpoint_every_seconds and at shutdown), so a resumed run learns
    at once instead of refilling its replay; --no-checkpoint-replay saves the disk."""
    resume: bool = False
    """Require a checkpoint in the run dir and continue from it (a run dir that holds one
    of the same config is resumed even without this flag)."""
    force_resume: bool = False
    """Continue from a checkpoint even if it was trained with other training settings (see
    RESUME_SAFE_FIELDS for the settings that may change without it)."""
    max_restarts: int = 3
    """Local runs: how many times the launcher restarts a process that died unexpectedly
    (a bundle rejoins; the server comes back from its last checkpoint; in sync mode every
    process starts again from the last checkpoint)."""
    max_bundles: int = 0
    """Room for bundles that join the running job (`--join`): the most bundles at once,
    those started with it included; 0, none can join. Needs token wire security and
    gradient_part all. A joined bundle plays a started bundle's share of total_frames, and
    the run ends once the started bundles are done and no joined one is active."""
    join: str = ""
    """Join the running job whose run directory this is, as one more bundle (its server
    must have been started with room: --max-bundles), with that run's own settings; it
    reads RUN_DIR/join.json, which only the run's owner can read. SIGTERM takes it out
    again without stopping the run."""

    # --- logging ---------------------------------------------------------------------
    log_every_seconds: float = 10.0
    """Seconds between progress lines."""


def cartpole_defaults() -> Config:
    """Settings that solve CartPole-v1 in a couple of minutes on 2 cores."""
    return Config(
        env_id="CartPole-v1",
        total_frames=100_000,
        run_dir="runs/cartpole",
        num_envs=4,
        double_dqn=True,
        n_step=3,
        gamma=0.99,
        batch_size=64,
        learning_rate=1e-3,
        learning_rate_decay_updates=0,
        optimizer_eps=1e-8,
        train_every=4,
        learning_starts=1_000,
        target_period=250,
        sync_every=2,
        replay_capacity=50_000,
        epsilon_start=1.0,
        epsilon_end=0.02,
        epsilon_decay_frames=15_000,
        log_every_seconds=5.0,
    )


def _fail(field: str, rule: str, value: object) -> None:
    raise ConfigError(f"config.{field}: {rule}, got {value!r}")


def validate(config: Config, *, local_device_count: int | None = None) -> Config:
    """Check every rule a run relies on; raise one-line ConfigError naming the field."""
    positive = (
        "total_frames",
        "num_envs",
        "batch_size",
        "n_step",
        "train_every",
        "target_period",
        "replay_capacity",
        "epsilon_decay_frames",
        "max_episode_frames",
        "workers",
        "server_shards",
        "sync_every",
        "push_every",
        "max_staleness",
        "outlier_warmup",
        "checkpoint_every_updates",
        "checkpoint_keep",
    )
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            _fail(name, "must be a positive integer", value)
    for name in (
        "learning_starts",
        "noop_max",
        "max_message_mb",
        "learning_rate_decay_start",
        "learning_rate_decay_updates",
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            _fail(name, "must be a non-negative integer", value)
    for name in ("epsilon_start", "epsilon_end", "sticky_action_prob", "priority_alpha"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            _fail(name, "must be in [0, 1]", value)
    if not 0.0 <= config.priority_beta_start <= 1.0:
        _fail("priority_beta_start", "must be in [0, 1]", config.priority_beta_start)
    if not 0.0 < config.gamma <= 1.0:
        _fail("gamma", "must be in (0, 1]", config.gamma)
    for name in ("learning_rate", "learning_rate_end", "optimizer_eps", "huber_delta",
                 "priority_eps"):  # fmt: skip
        value = getattr(config, name)
        if not value > 0:
            _fail(name, "must be > 0", value)
    if config.learning_rate_decay_updates and config.learning_rate_end > config.learning_rate:
        rule = (f"must be <= learning_rate ({config.learning_rate}), the rate it decays from: "
                "lower it with --learning-rate-end, or keep the rate constant with "
                "--learning-rate-decay-updates 0")  # fmt: skip
        _fail("learning_rate_end", rule, config.learning_rate_end)
    if config.single_process and config.push_every != 1:
        _fail("push_every", "applies to the bundles of a distributed run, not --single-process",
              config.push_every)  # fmt: skip
    if config.max_grad_norm < 0:
        _fail("max_grad_norm", "must be >= 0 (0 disables clipping)", config.max_grad_norm)
    if not isinstance(config.max_restarts, int) or config.max_restarts < 0:
        _fail("max_restarts", "must be a non-negative integer", config.max_restarts)
    for name in (
        "stats_every_seconds",
        "server_timeout_seconds",
        "server_retry_seconds",
        "checkpoint_every_seconds",
    ):
        if getattr(config, name) <= 0:
            _fail(name, "must be > 0", getattr(config, name))
    if config.outlier_k < 0:
        _fail("outlier_k", "must be >= 0 (0 disables the filter)", config.outlier_k)
    if config.wire_security not in ("token", "curve"):
        _fail("wire_security", "must be token or curve", config.wire_security)
    if config.dc_asgd not in ("off", "constant", "adaptive"):
        _fail("dc_asgd", "must be one of off, constant, adaptive", config.dc_asgd)
    if config.mode not in ("gorila", "sync"):
        _fail("mode", "must be gorila or sync", config.mode)
    if config.mode == "sync":
        validate_sync(config)
    parse_gradient_part(config.gradient_part)
    if not isinstance(config.max_bundles, int) or config.max_bundles < 0:
        _fail("max_bundles", "must be a non-negative integer", config.max_bundles)
    if config.max_bundles or config.join:
        name, value = ("join", config.join) if config.join else ("max_bundles", config.max_bundles)
        if config.wire_security != "token":
            _fail(name, "needs --wire-security token (CURVE keys are exchanged at launch)", value)
        if config.gradient_part != "all":
            _fail(name, "needs --gradient-part all (a part per bundle is fixed at launch)", value)
        if config.mode != "gorila" or config.single_process:
            _fail(name, "adds bundles to a Gorila run, not to a sync or single-process one", value)
    if config.aggregate_per_host:
        if config.single_process or config.mode != "gorila":
            _fail("aggregate_per_host", "aggregates the bundles of a Gorila run, not a "
                  "single-process or sync one", config.aggregate_per_host)  # fmt: skip
        if config.wire_security != "token":
            _fail("aggregate_per_host", "needs --wire-security token (its bundles present "
                  "the run's credentials)", config.aggregate_per_host)  # fmt: skip
        if config.gradient_part != "all":
            _fail("aggregate_per_host", "needs --gradient-part all (it sums whole gradients)",
                  config.aggregate_per_host)  # fmt: skip
        if config.max_bundles or config.join:
            _fail("aggregate_per_host", "takes no joining bundles (--max-bundles, --join)",
                  config.aggregate_per_host)  # fmt: skip
    if config.log_every_seconds <= 0:
        _fail("log_every_seconds", "must be > 0", config.log_every_seconds)
    if config.optimizer not in OPTIMIZERS:
        _fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}", config.optimizer)
    if any(not isinstance(w, int) or w <= 0 for w in config.mlp_hidden) or not config.mlp_hidden:
        _fail("mlp_hidden", "must be one or more positive integers", config.mlp_hidden)
    if local_device_count is not None and config.batch_size % local_device_count:
        _fail(
            "batch_size",
            f"must be divisible by the local device count ({local_device_count})",
            config.batch_size,
        )
    min_capacity = Replay.min_capacity(config.num_envs, stack_size(config.env_id), config.n_step)
    if config.replay_capacity < min_capacity:
        _fail(
            "replay_capacity",
            f"must hold at least num_envs * (stack + n_step + 1) = {min_capacity} transitions",
            config.replay_capacity,
        )
    if config.replay_capacity < config.batch_size:
        _fail(
            "replay_capacity",
            f"must be >= batch_size ({config.batch_size})",
            config.replay_capacity,
        )
    validate_env_id(config.env_id)
    return config


def validate_sync(config: Config) -> None:
    """A sync run has no parameter server and several processes: refuse the settings that
    only a server or a single process has (they would be ignored without a word)."""
    if config.single_process:
        _fail("mode", "sync is several processes averaging their gradients; drop "
              "--single-process (or --mode sync)", config.mode)  # fmt: skip
    if config.workers < 2:
        _fail("workers", "a sync run needs at least 2 processes", config.workers)
    if config.server_shards != 1:
        _fail("server_shards", "a sync run has no parameter server (--mode sync)",
              config.server_shards)  # fmt: skip
    if config.dc_asgd != "off":
        _fail("dc_asgd", "a sync run applies no stale gradient to compensate (--mode sync)",
              config.dc_asgd)  # fmt: skip
    if config.push_every != 1:
        _fail("push_every", "a sync run pushes nothing (--mode sync)", config.push_every)
    if config.gradient_part != "all":
        _fail("gradient_part", "a sync run averages whole gradients (--mode sync)",
              config.gradient_part)  # fmt: skip


def parse_gradient_part(value: str) -> float | str:
    """ "all", "default", or a fraction in (0, 1]; anything else is a ConfigError."""
    if value in ("all", "default"):
        return value
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        _fail("gradient_part", 'must be "all", "default" or a fraction in (0, 1]', value)
    return fraction


def dc_asgd_lambda(config: Config) -> float | None:
    """The DC-ASGD lambda in force (None when delay compensation is off)."""
    if config.dc_asgd == "off":
        return None
    if config.dc_asgd_lambda >= 0:
        return config.dc_asgd_lambda
    return 2.0 if config.dc_asgd == "adaptive" else 0.04


def validate_env_id(env_id: str) -> None:
    """Refuse an id that is neither CartPole nor an envpool Atari game, saying how to list them."""
    if env_id in CARTPOLE_IDS:
        return
    if env_id not in atari_env_ids():
        _fail(
            "env_id",
            "unknown environment; list valid ids with `python -m gorila_jax.envs`",
            env_id,
        )


# Settings a run may change when it resumes from a checkpoint: how long it goes on, where
# and how often it logs and checkpoints, how it restarts and waits. Every other field is a
# training setting, and a checkpoint is resumed only by a run whose training settings match.
RESUME_SAFE_FIELDS = (
    "total_frames",
    "run_dir",
    "resume",
    "force_resume",
    "max_restarts",
    "log_every_seconds",
    "stats_every_seconds",
    "checkpoint_every_updates",
    "checkpoint_every_seconds",
    "checkpoint_keep",
    "checkpoint_replay",
    "server_timeout_seconds",
    "server_retry_seconds",
    "max_message_mb",
    "wire_security",
    "max_bundles",
    "join",
)


def to_dict(config: Config) -> dict:
    """The config as plain YAML/JSON-able values."""
    out = dataclasses.asdict(config)
    out["mlp_hidden"] = list(config.mlp_hidden)
    return out


def training_settings(config: Config) -> dict:
    """The fields a resumed run must share with the run that made the checkpoint."""
    return {k: v for k, v in to_dict(config).items() if k not in RESUME_SAFE_FIELDS}


def fingerprint(config: Config) -> str:
    """A short hash of the training settings (every field but RESUME_SAFE_FIELDS)."""
    text = json.dumps(training_settings(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Fields renamed since runs were written: a config file or a checkpoint's config with the
# old name reads as the new one.
RENAMED_FIELDS = {"shard_factor": "gradient_part"}


def with_current_names(values: dict) -> dict:
    """`values` (a config as a mapping) with renamed fields under their current names,
    each rename said in one warning line (nothing is read differently without a word)."""
    if not isinstance(values, dict):
        return values
    for old in sorted(set(values) & set(RENAMED_FIELDS)):
        new = RENAMED_FIELDS[old]
        if new in values and values[new] != values[old]:
            raise ConfigError(f"config: {old} (the old name of {new}) and {new} disagree")
        logging.getLogger(__name__).warning(
            f"config field {old} is called {RENAMED_FIELDS[old]} now; read as {RENAMED_FIELDS[old]}"
        )
    return {RENAMED_FIELDS.get(name, name): value for name, value in values.items()}


# Fields added since runs were written whose absence from a saved config means another value
# than today's default: a run saved before the learning rate could decay kept it constant.
ABSENT_MEANS = {"learning_rate_decay_updates": 0}


def completed(saved: dict) -> dict:
    """A saved config (a `to_dict`, perhaps of an older version) under today's field names,
    each field it lacks filled with its default, or with what its absence meant
    (`ABSENT_MEANS`)."""
    return {**to_dict(Config()), **ABSENT_MEANS, **with_current_names(saved)}


def optimizer_state_shape(values: dict) -> dict:
    """The settings (of a `completed` config) that decide the structure of the optimizer's
    state, as a mapping: the base optimizer, clipping on or off, DC-ASGD where a server
    applies it (a single or sync process never compensates), the learning-rate decay on or
    off. A checkpoint's optimizer state loads only into the same shape."""
    server = values["mode"] == "gorila" and not values["single_process"]
    return {
        "optimizer": values["optimizer"],
        "gradient clipping": "on" if values["max_grad_norm"] else "off",
        "dc_asgd": values["dc_asgd"] if server else "off",
        "learning-rate decay": "on" if values["learning_rate_decay_updates"] else "off",
    }


def resume_differences(saved: dict, config: Config) -> list[str]:
    """The training settings in which `config` differs from `saved` (a `to_dict` of the
    config a checkpoint was made with), as "field saved -> now" strings. A field the saved
    config lacks (it predates the field) counts as its default, or as what its absence
    meant (`ABSENT_MEANS`)."""
    saved = completed(saved)
    differences = []
    for name, value in training_settings(config).items():
        before = saved[name]
        if before != value:
            differences.append(f"{name} {before!r} -> {value!r}")
    return differences


def from_dict(values: dict, base: Config) -> Config:
    """Override `base` with a mapping (from YAML); unknown keys are refused by name."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file: must hold a mapping of field: value, got {type(values).__name__}"
        )
    values = with_current_names(values)
    known = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"config file: unknown field(s) {', '.join(unknown)}")
    converted = dict(values)
    if "mlp_hidden" in converted:
        converted["mlp_hidden"] = tuple(converted["mlp_hidden"])
    if "gradient_part" in converted:
        converted["gradient_part"] = str(converted["gradient_part"])
    for name, value in converted.items():
        default = getattr(base, name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"config.{name}: must be true or false, got {value!r}")
        if isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"config.{name}: must be a number, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, float) and not value.is_integer():
                    raise ConfigError(f"config.{name}: must be an integer, got {value!r}")
                converted[name] = int(value)
    return dataclasses.replace(base, **converted)


def load_yaml(path: str | Path, base: Config) -> Config:
    """Read a YAML mapping of field: value over `base`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file: {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"config file: {path} is not valid YAML ({first_line})") from None
    return from_dict(values, base)


def load_run_yaml(path: str | Path) -> Config:
    """The config.yaml a run wrote, as that run trained: a field it lacks (it predates the
    field) reads as what its absence meant (`ABSENT_MEANS`), else as its default."""
    return load_yaml(path, dataclasses.replace(Config(), **ABSENT_MEANS))


def parse_cli(
    default: Config, args: Sequence[str] | None = None, description: str | None = None
) -> Config:
    """Build the config from `--config FILE` (optional) and flags, then validate it.

    A bad value exits with status 2 and one line naming the field and the rule.
    """
    args = list(sys.argv[1:] if args is None else args)
    try:
        base = default
        if "--config" in args:
            at = args.index("--config")
            if at + 1 >= len(args):
                raise ConfigError("--config: needs a path to a YAML file")
            base = load_yaml(args[at + 1], default)
            del args[at : at + 2]
        try:
            config = parse(Config, args, default=base, description=description)
        except CommandLineError as error:
            raise ConfigError(str(error)) from None
        return validate(config)
    except ConfigError as error:
        raise SystemExit(fail(str(error))) from None
