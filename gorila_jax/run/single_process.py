"""Single-process DQN: one bundle whose learner applies its own updates (no parameter server).

The same loop, networks and learner step as a Gorila bundle; only the updater differs. Useful
on a laptop, for debugging, and as the baseline that the distributed runs are compared with.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import jax

from gorila_jax.bundle.loop import LoopCounters, LoopResult, make_replay, run_actor_learner
from gorila_jax.bundle.replay_checkpoint import replay_saver, restore_replay
from gorila_jax.core.config import Config, validate
from gorila_jax.core.learner import copy_params, local_mesh, make_train_step, shardings
from gorila_jax.core.model import Model
from gorila_jax.core.optim import config_optimizer
from gorila_jax.core.replay import Sample
from gorila_jax.envs import make_env
from gorila_jax.io import logs
from gorila_jax.io.checkpoint import Checkpointer, CheckpointError, run_meta
from gorila_jax.io.config_file import write_resolved
from gorila_jax.io.files import private_files
from gorila_jax.io.params_file import save_params

log = logging.getLogger(__name__)


class LocalLearner:
    """Thin stateful shell over the fused jitted train step: params, target, optimizer state."""

    def __init__(self, config: Config, network, params: Any, *, seed: int):
        self.config = config
        mesh = local_mesh()
        self._where = shardings(mesh)
        self.params_sharding = self._where.replicated
        optimizer = config_optimizer(config, server=False)
        self.params = jax.device_put(params, self._where.replicated)
        self.target_params = copy_params(self.params)
        self.opt_state = jax.device_put(optimizer.init(self.params), self._where.replicated)
        self._train_step = make_train_step(
            network,
            optimizer,
            double_dqn=config.double_dqn,
            huber_delta=config.huber_delta,
            mesh=mesh,
        )
        self.updates = 0
        self.server_version = None

    def acting_params(self) -> Any:
        """The online params (always current: no server)."""
        return self.params

    def learn(self, sample: Sample, frames: int = 0):
        """One fused gradient + optimizer step; refresh the target every target_period."""
        batch = jax.device_put(sample.transition, self._where.batch)
        weights = jax.device_put(sample.weights, self._where.batch)
        self.params, self.opt_state, metrics = self._train_step(
            self.params, self.target_params, self.opt_state, batch, weights
        )
        self.updates += 1
        if self.updates % self.config.target_period == 0:
            self.target_params = copy_params(self.params)
        return metrics

    def should_stop(self) -> bool:
        """Single-process runs stop only on their frame budget."""
        return False


def learner_state(learner: LocalLearner) -> dict:
    """The pytree a single-process checkpoint holds: online and target params, optimizer."""
    return {
        "params": learner.params,
        "target_params": learner.target_params,
        "opt_state": learner.opt_state,
    }


def restore_learner(
    config: Config, learner: LocalLearner, checkpointer: Checkpointer
) -> int | None:
    """Load the newest usable learner checkpoint into `learner`; its frames, or None."""
    restored = checkpointer.restore_latest(
        jax.device_get(learner_state(learner)),
        config=config,
        force=config.force_resume,
    )
    if restored is None:
        if config.resume:
            raise CheckpointError(f"--resume: no checkpoint in {checkpointer.directory}")
        return None
    where = learner.params_sharding
    learner.params = jax.device_put(restored.state["params"], where)
    learner.target_params = jax.device_put(restored.state["target_params"], where)
    learner.opt_state = jax.device_put(restored.state["opt_state"], where)
    learner.updates = int(restored.meta["updates"])
    return int(restored.meta.get("frames", 0))


def write_learner_checkpoint(
    checkpointer: Checkpointer,
    config: Config,
    state: Any,
    updates: int,
    frames: int,
    *,
    replay_saved: bool,
) -> bool:
    """Write the learner's checkpoint (`state`, host arrays) at `updates` and `frames`,
    after its replay was saved (`replay_saved`: whether it was); True when it is on disk.

    With no update since the last checkpoint the same step is written again at the new
    frames, but only when its replay was saved (else the previous pair is kept). Anything
    not written is one warning line and False.
    """
    again = updates in checkpointer.versions()
    if again and not replay_saved:
        log.warning(
            f"learner checkpoint at {updates:,} updates not written again: its replay "
            f"was not saved; the previous pair is kept"
        )
        return False
    meta = {"updates": updates, "frames": frames, **run_meta(config)}
    try:
        saved = checkpointer.save(updates, state, meta, replace=again)
    except Exception as error:  # orbax raises many types (a full disk among them)
        log.warning(
            f"learner checkpoint at {updates:,} updates not written "
            f"({type(error).__name__}: {' '.join(str(error).split())[:150]}); "
            "the previous one is kept"
        )
        return False
    if not saved:
        newest = max(checkpointer.versions(), default=None)
        log.warning(
            f"learner checkpoint at {updates:,} updates skipped (orbax refused it; "
            f"the newest on disk is at {newest} updates); the previous one is kept"
        )
        return False
    return True


def train(config: Config, stop_event: threading.Event | None = None) -> LoopResult:
    """Train in this process until `config.total_frames` or `stop_event`; save the params.

    The learner (params, target, optimizer state, update count) is checkpointed with orbax
    in RUN_DIR/checkpoints and the replay with its counters in RUN_DIR/replay/single, every
    `checkpoint_every_seconds` and when the loop ends; a run directory holding them is
    resumed from them. This is the single process's role: its log records are named
    "single process" (`logs.setup`). The run directory and all written in it are the
    owner's alone (`files.private_files`).

    A learner checkpoint always pairs with a replay checkpoint of the same frame count: while
    the update count stays put (before learning starts) the learner's checkpoint is written
    again with the new frame count once its replay is on disk, and the replay of the learner
    checkpoint on disk is never pruned. A checkpoint not written is one warning line.
    """
    logs.setup("single process")
    validate(config, local_device_count=jax.local_device_count())
    run_dir = Path(config.run_dir)
    with private_files(run_dir):
        return _train(config, run_dir, stop_event)


def _train(config: Config, run_dir: Path, stop_event: threading.Event | None) -> LoopResult:
    env = make_env(config, seed=config.seed, training=True)
    checkpointer = None
    try:
        replay = make_replay(config, env, seed=config.seed)
        model = Model.from_env(config, env)
        learner = LocalLearner(config, model.network, model.init(config.seed), seed=config.seed)
        checkpointer = Checkpointer(run_dir, keep=config.checkpoint_keep)
        learner_frames = restore_learner(config, learner, checkpointer)
        if learner_frames is not None:
            log.info(f"resumed its learner at {learner.updates:,} updates")
        # Only the replay saved together with that learner checkpoint (same frames) is
        # loaded; without a learner checkpoint, none is.
        replay_checkpointer, resume = restore_replay(
            config, replay, bundle=0, bundles=1, frames=learner_frames or 0
        )
        write_resolved(config, run_dir)
        save_replay = replay_saver(replay_checkpointer, replay)

        # The frames of the learner checkpoint on disk: its replay is never pruned.
        paired_frames = learner_frames

        def save_checkpoint(counters: LoopCounters) -> None:
            nonlocal paired_frames
            updates = learner.updates
            # The replay first: a learner checkpoint on disk always has its replay beside it.
            replay_saved = save_replay is None or (
                save_replay(counters, {"updates": updates}, spare=paired_frames) is not None
            )
            state = jax.device_get(learner_state(learner))
            if write_learner_checkpoint(
                checkpointer, config, state, updates, counters.frames, replay_saved=replay_saved
            ):
                paired_frames = counters.frames

        log.info(
            f"single-process DQN on {config.env_id}: {env.num_envs} envs, "
            f"{jax.local_device_count()} local device(s), run dir {run_dir}"
        )
        result = run_actor_learner(
            config,
            learner,
            env,
            replay,
            seed=config.seed,
            run_dir=run_dir,
            start_frames=learner_frames or 0,
            stop_event=stop_event,
            resume=resume,
            checkpoint=save_checkpoint,
        )
        save_params(learner.params, run_dir / "params.msgpack")
        log.info(
            f"{'stopped' if stop_event is not None and stop_event.is_set() else 'done'}: "
            f"{result.frames:,} frames, {result.updates:,} updates, "
            f"{result.episodes} episodes, "
            f"mean return of the last 20: {result.mean_recent_return:.2f}"
        )
        return result
    finally:
        if checkpointer is not None:
            checkpointer.close()
        env.close()
