"""The process of a sync run (`--mode sync`): a bundle that takes every learner step
together with all the others, with no parameter server.

Every process of the run is a bundle (named "bundle i", i = process index + 1, its files in
RUN_DIR/bundle{i}): its own environments, replay and epsilon-greedy policy, on its share of
`total_frames`. Each learner step is one jitted program over every device of every process
(`collectives.make_sync_train_step`): each process gives its own replay batch as its rows
of the global batch, one all-reduce averages the gradients over that batch, and every
process applies the same optax update to the same replicated params. The processes stay in the
jax.distributed group for the whole run (gloo carries the collectives on CPU).

So that every process calls the same collectives in the same order, the processes agree on
what each turn of the loop does (`loop.Turn`: learn only when all can, stop or checkpoint
when any asks; `SyncLearner.lockstep`), through the learner steps' own all-reduce once
all are learning.

At start every process publishes, through jax.distributed's key-value store, the
fingerprint of its whole config and of its initial params (and process 0 what its
checkpoint restore found): a process that differs stops the run before training, with one
line naming it. Checkpoints are a single process's, with one writer: every process saves
its replay (RUN_DIR/replay/bundle{i}), then process 0 the learner (RUN_DIR/checkpoints, with
orbax told that it writes alone), at the same turn; a resume gives every process process
0's learner, and the replays only if every process has its own of the same frames.

A process that is gone makes the next collective fail in the others: each says so in one
line and exits with `launcher.EXIT_LOST_PROCESS` at once. (Where a process has several
devices, gloo does not fail but waits: the local launcher then ends the others, and jax's
coordination service does otherwise, as it does for a process that hangs, after
`rendezvous.SYNC_HEARTBEAT_SECONDS`.) The local launcher restarts the whole run, which
resumes from the last checkpoint, as SLURM's requeue does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from gorila_jax.bundle.loop import LoopCounters, Turn, make_replay, run_actor_learner
from gorila_jax.bundle.replay_checkpoint import replay_saver, restore_replay
from gorila_jax.core.cli import fail
from gorila_jax.core.collectives import (
    any_process,
    broadcast_from_first,
    global_mesh,
    local_rows,
    make_sync_train_step,
    to_global,
)
from gorila_jax.core.config import Config, to_dict, validate
from gorila_jax.core.learner import StepMetrics, copy_params, shardings
from gorila_jax.core.model import Model
from gorila_jax.core.optim import config_optimizer
from gorila_jax.core.replay import Sample
from gorila_jax.envs import make_env
from gorila_jax.io.checkpoint import Checkpointer, CheckpointError
from gorila_jax.io.config_file import write_resolved
from gorila_jax.io.files import private_files
from gorila_jax.io.params_file import save_params
from gorila_jax.run.launcher import EXIT_LOST_PROCESS, EXIT_STOPPED
from gorila_jax.run.single_process import learner_state, write_learner_checkpoint
from gorila_jax.wire import rendezvous, transport

log = logging.getLogger(__name__)

XLA_STATUSES = ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:")


class StepFailed(RuntimeError):
    """A step the processes take together failed: a process of the run is gone."""


class StartMismatch(RuntimeError):
    """The processes of a sync run do not start from the same config or params."""


def _collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed at run time (a peer gone), rather than a
    bug: jax reports it as its runtime error, or a ValueError carrying an XLA status."""
    if isinstance(error, jax.errors.JaxRuntimeError):
        return True
    return isinstance(error, ValueError) and str(error).startswith(XLA_STATUSES)


def _failed(error: BaseException, what: str) -> StepFailed:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return StepFailed(f"{what} failed, a process of the run is gone? ({first})")


def _local(array: jax.Array) -> jax.Array:
    """This process's copy of a replicated global array (on its first local device)."""
    return array.addressable_data(0)


class SyncLearner:
    """Thin stateful shell over the train step jitted over every process's devices: global
    params, target and optimizer state, replicated, identical in every process; and the
    agreement of the loop's turns (`lockstep`)."""

    def __init__(self, config: Config, network, params: Any):
        self.config = config
        mesh = global_mesh()
        self._where = shardings(mesh)
        optimizer = config_optimizer(config, server=False)
        self.params = to_global(params, self._where.replicated)
        self.target_params = copy_params(self.params)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self._where.replicated)(self.params)
        self._train_step = make_sync_train_step(
            network,
            optimizer,
            double_dqn=config.double_dqn,
            huber_delta=config.huber_delta,
            mesh=mesh,
        )
        self.updates = 0
        self.server_version = None
        self._learning = False  # every process has learnt: the flags ride with the steps
        self._sent = (False, False)  # this process's (stop, checkpoint) for the next steps
        self._raised = (False, False)  # what every process said with the last steps

    def acting_params(self) -> Any:
        """This process's copy of the current params (the policy runs here alone)."""
        return jax.tree.map(_local, self.params)

    def learn(self, sample: Sample, frames: int = 0) -> StepMetrics:
        """One step of every process together: the mean gradient over all their batches,
        one optimizer update; the target refreshed every target_period. Its metrics are
        this process's: the global loss, its own samples' TD errors."""
        flags = np.tile(np.asarray(self._sent, np.int32), (jax.local_device_count(), 1))
        try:
            batch = to_global(sample.transition, self._where.batch)
            weights = to_global(sample.weights, self._where.batch)
            self.params, self.opt_state, metrics, raised = self._train_step(
                self.params,
                self.target_params,
                self.opt_state,
                batch,
                weights,
                to_global(flags, self._where.batch),
            )
            td_errors = local_rows(metrics.td_errors)
            raised = [bool(flag) for flag in np.asarray(_local(raised))]
        except (jax.errors.JaxRuntimeError, ValueError) as error:
            if not _collective_failure(error):
                raise
            raise _failed(error, f"learner step {self.updates + 1:,}") from None
        self._raised = (self._raised[0] or raised[0], self._raised[1] or raised[1])
        self.updates += 1
        if self.updates % self.config.target_period == 0:
            self.target_params = copy_params(self.params)
        return StepMetrics(
            loss=_local(metrics.loss),
            mean_q=_local(metrics.mean_q),
            mean_abs_td=_local(metrics.mean_abs_td),
            q_spread=_local(metrics.q_spread),
            td_errors=td_errors,
        )

    def lockstep(self, turn: Turn) -> Turn:
        """The turn every process takes (`run_actor_learner`'s `lockstep`): learn when all
        can, stop or checkpoint when any asks.

        Until every process has learnt, each turn is agreed by a collective of its own.
        From then on every process learns on every turn whose steps are due (their replays
        hold the same number of turns), and the stop and checkpoint flags ride with the
        learner steps: those of this turn's steps take effect the turn after (both stay
        raised where they were raised until they are acted on).
        """
        if not self._learning:
            cannot_learn, stop, checkpoint = agree(
                [not turn.learn, turn.stop, turn.checkpoint], "a turn"
            )
            self._learning = not cannot_learn
            return Turn(learn=not cannot_learn, stop=stop, checkpoint=checkpoint)
        if not turn.learn:
            raise StepFailed(
                "this process's replay can no longer give a batch while the others learn; "
                "raise --replay-capacity or --learning-starts"
            )
        (stop, checkpoint), self._raised = self._raised, (False, False)
        # What this turn does is not asked for again by its steps.
        self._sent = (turn.stop and not stop, turn.checkpoint and not checkpoint)
        return Turn(learn=True, stop=stop, checkpoint=checkpoint)

    def should_stop(self) -> bool:
        """No server to say stop: only the frame budget or a signal ends the run."""
        return False

    def host_state(self) -> dict:
        """The learner's state as host arrays (what a checkpoint holds)."""
        return jax.tree.map(lambda leaf: np.asarray(_local(leaf)), learner_state(self))

    def set_state(self, state: dict, updates: int) -> None:
        """Take the same `state` (host arrays) as every other process, at `updates`."""
        self.params = to_global(state["params"], self._where.replicated)
        self.target_params = to_global(state["target_params"], self._where.replicated)
        self.opt_state = to_global(state["opt_state"], self._where.replicated)
        self.updates = updates


def agree(flags: list[bool], what: str) -> list[bool]:
    """`collectives.any_process`, a failure of which says a process is gone."""
    try:
        return any_process(flags)
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if not _collective_failure(error):
            raise
        raise _failed(error, what) from None


def start_record(config: Config, params: Any, restored: dict | None, error: str | None) -> str:
    """What a process publishes at start: the fingerprints of its whole config and of its
    initial params, and (process 0) what its checkpoint restore found."""
    config_text = json.dumps(to_dict(config), sort_keys=True)
    values = np.asarray(ravel_pytree(jax.device_get(params))[0])
    params_hash = hashlib.sha256(transport.tree_fingerprint(params).encode())
    params_hash.update(values.astype(values.dtype.newbyteorder("<")).tobytes())
    return json.dumps(
        {
            "config": hashlib.sha256(config_text.encode()).hexdigest()[:16],
            "params": params_hash.hexdigest()[:16],
            "restored": restored,
            "error": error,
        }
    )


def check_start(records: list[str]) -> dict:
    """Process 0's start record, once every process's matches it; StartMismatch (one line
    naming the first process that differs) or CheckpointError (process 0's) otherwise."""
    parsed = [json.loads(record) for record in records]
    first = parsed[0]
    for index, record in enumerate(parsed):
        name = f"process {index} (bundle {index + 1})"
        if record["config"] != first["config"]:
            raise StartMismatch(
                f"sync run: {name} runs another config than process 0 (fingerprint "
                f"{record['config']} vs {first['config']}); start every process with the "
                "same command"
            )
        if record["params"] != first["params"]:
            raise StartMismatch(
                f"sync run: {name} starts from other params than process 0 (fingerprint "
                f"{record['params']} vs {first['params']}); every process must build the "
                "same network from the same seed (the same versions of jax and flax)"
            )
    if first["error"]:
        raise CheckpointError(first["error"])
    return first


def run_sync(
    config: Config, info: rendezvous.ProcessInfo, keys: rendezvous.RunKeys, stop: threading.Event
) -> int:
    """Be process `info.index` of a sync run; the exit status (a lost process: this
    process ends at once, with one line, `EXIT_LOST_PROCESS`)."""
    if info.count < 2:
        return fail(
            f"a sync run needs at least 2 processes, and {info.count} was started; use "
            "srun -n 2 or more, or --single-process"
        )
    try:
        validate(config, local_device_count=jax.local_device_count())
        with private_files(Path(config.run_dir)):
            return _run_sync(config, info, keys, stop)
    except StartMismatch as error:
        return fail(str(error))
    except StepFailed as error:
        log.error(
            f"{error}; stopping: a sync run needs every process for every step (it resumes "
            "from its last checkpoint when started again)"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a normal exit: jax's exit handler would wait at a barrier for the gone process.
        os._exit(EXIT_LOST_PROCESS)


def _run_sync(
    config: Config, info: rendezvous.ProcessInfo, keys: rendezvous.RunKeys, stop: threading.Event
) -> int:
    run_dir = Path(config.run_dir)
    bundle = info.index + 1
    writer = info.index == 0
    env = make_env(config, seed=config.seed + bundle, training=True)
    checkpointer = None
    try:
        replay = make_replay(config, env, seed=config.seed + bundle)
        model = Model.from_env(config, env)
        initial = model.init(config.seed)  # the same in every process (checked below)
        restored, error = None, None
        if writer:
            checkpointer = Checkpointer(run_dir, keep=config.checkpoint_keep)
            optimizer = config_optimizer(config, server=False)
            template = {"params": initial, "target_params": initial}
            template["opt_state"] = optimizer.init(initial)
            try:
                restored = restore_latest(config, checkpointer, jax.device_get(template))
            except CheckpointError as refused:
                error = str(refused)
        record = start_record(
            config,
            initial,
            None if restored is None else {"updates": restored[1], "frames": restored[2]},
            error,
        )
        store = rendezvous.StoreRendezvous(keys.rendezvous_key)
        first = check_start(store.exchange("start", info.index, record, info.count))
        # Every process is here now: the first collective (which sets up gloo, and fails
        # if a process is more than 30 s late) comes before anything slow.
        agree([False], "the first collective")
        learner = SyncLearner(config, model.network, initial)
        learner_frames = None
        if first["restored"] is not None:
            template = learner.host_state()
            try:
                leaves = broadcast_from_first(restored[0] if writer else jax.tree.leaves(template))
            except (jax.errors.JaxRuntimeError, ValueError) as failure:
                if not _collective_failure(failure):
                    raise
                raise _failed(failure, "the restore") from None
            learner.set_state(
                jax.tree.unflatten(jax.tree.structure(template), leaves),
                first["restored"]["updates"],
            )
            learner_frames = first["restored"]["frames"]
            log.info(f"resumed its learner at {learner.updates:,} updates")
        replay_checkpointer, resume = restore_replay(
            config, replay, bundle=bundle, bundles=info.count, frames=learner_frames or 0
        )
        if agree([resume is None], "the replay restore")[0] and resume is not None:
            log.warning(
                "another process has no replay checkpoint of these frames: every process "
                "starts with an empty replay, so that all learn from the same turn"
            )
            replay.reset()
            resume = None
        if writer:
            write_resolved(config, run_dir)
        save_replay = replay_saver(replay_checkpointer, replay)
        paired_frames = learner_frames  # its replay is never pruned

        def save_checkpoint(counters: LoopCounters) -> None:
            nonlocal paired_frames
            updates = learner.updates
            saved = save_replay is None or (
                save_replay(counters, {"updates": updates}, spare=paired_frames) is not None
            )
            every_replay_saved = not agree([not saved], "the checkpoint")[0]
            written = writer and write_learner_checkpoint(
                checkpointer,
                config,
                learner.host_state(),
                updates,
                counters.frames,
                replay_saved=every_replay_saved,
            )
            if agree([written], "the checkpoint")[0]:
                paired_frames = counters.frames

        frame_budget = config.total_frames // info.count
        log.info(
            f"sync run, {info.count} processes: {env.num_envs} envs, learner over "
            f"{jax.local_device_count()} local of {jax.device_count()} device(s), replay "
            f"{config.replay_capacity:,}, batch {config.batch_size} here "
            f"({config.batch_size * info.count} in all)"
        )
        result = run_actor_learner(
            config,
            learner,
            env,
            replay,
            seed=config.seed + bundle,
            run_dir=run_dir / f"bundle{bundle}",
            bundle=bundle,
            frame_budget=frame_budget,
            epsilon_frame_scale=info.count,
            start_frames=learner_frames or 0,
            stop_event=stop,
            resume=resume,
            checkpoint=save_checkpoint,
            lockstep=learner.lockstep,
        )
        if writer:
            save_params(learner.host_state()["params"], run_dir / "params.msgpack")
        stopped = result.frames < frame_budget
        log.info(
            f"{'stopped' if stopped else 'done'}: {result.frames:,} frames, "
            f"{result.updates:,} updates, {result.episodes} episodes, "
            f"mean return of the last 20: {result.mean_recent_return:.2f}"
        )
        return EXIT_STOPPED if stopped else 0
    finally:
        if checkpointer is not None:
            checkpointer.close()
        env.close()


def restore_latest(
    config: Config, checkpointer: Checkpointer, template: dict
) -> tuple[list, int, int] | None:
    """Process 0: the newest usable learner checkpoint as (state leaves, updates, frames),
    or None; CheckpointError when it is refused, or with --resume when there is none."""
    restored = checkpointer.restore_latest(template, config=config, force=config.force_resume)
    if restored is None:
        if config.resume:
            raise CheckpointError(f"--resume: no checkpoint in {checkpointer.directory}")
        return None
    updates, frames = int(restored.meta["updates"]), int(restored.meta.get("frames", 0))
    return jax.tree.leaves(restored.state), updates, frames
