"""Stale gradients on a saved replay: does the server's optimizer keep the network alive?

Trains one Atari Q-network offline on the replay memory a run saved (RUN_DIR/replay/bundleN),
the way a Gorila server applies pushes: every update's gradient is computed on the params of
`d` updates before (d drawn uniformly from [staleness_min, staleness_max]) and applied by the
run's own optimizer chain (clipping, DC-ASGD if asked, Adam or another base) to the current
params; the target network is refreshed every target_period updates. With staleness 0 it is
plain synchronous DQN on fixed data.

Every `report_every` updates it prints, on 160 frames of random play, the Q spread (std over
the frames of max_a Q) and, per hidden layer, the share of units that are positive on none
of them (dead ReLUs). One `--seed` fixes the init, the replay's sampling and the delays,
so runs of one seed with different optimizer settings see the same data from the same
init; the 160 frames are the same for every seed.

    python experiments/stale_replay.py RUN_DIR --staleness-min 4 --staleness-max 15
    python experiments/stale_replay.py RUN_DIR --optimizer-eps 1.5e-4 --seed 3

The optimizer is the run's own unless a flag says otherwise. The run directory is only
read: the replay checkpoint is restored from a copy.

It isolates one cause of the early deaths of Pong runs in docs/pong-seed1/attempt-5: the
staleness alone, with no actors, no second bundle and no growing replay.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from gorila_jax.core import cli
from gorila_jax.core.config import ConfigError, load_run_yaml, validate
from gorila_jax.core.env_ids import CARTPOLE_IDS, stack_size
from gorila_jax.core.learner import make_loss_fn
from gorila_jax.core.networks import NatureCNN
from gorila_jax.core.optim import config_optimizer

HIDDEN_LAYERS = ("conv1", "conv2", "conv3", "fc")
PROBE_STEPS, PROBE_EVERY, PROBE_ENVS = 200, 10, 8  # 160 frames of random play


@dataclasses.dataclass(frozen=True)
class StaleReplayArgs:
    """Offline training on a run's saved replay with stale gradients."""

    run_dir: tyro.conf.Positional[Path]
    """A run directory of an Atari run with a replay checkpoint (RUN_DIR/replay/bundleN)."""
    bundle: int = 1
    """Whose replay to train on (1-based, as the directories are named)."""
    staleness_min: int = 4
    """Fewest server updates between the params a gradient is computed on and the update
    that applies it."""
    staleness_max: int = 15
    """Most such updates (4 to 15: the staleness of a 2-bundle Pong run on 2 cores)."""
    updates: int = 4000
    """Updates to train for."""
    report_every: int = 2000
    """Print the Q spread and dead units every this many updates."""
    optimizer: Literal["adam", "rmsprop", "sgd", "adagrad"] | None = None
    """The server's base optimizer; the run's own when not given."""
    learning_rate: float | None = None
    """Its learning rate; the run's own when not given (the run's decay schedule, if it has
    one, counts from update 0: it starts at the run's learning_rate_decay_start)."""
    optimizer_eps: float | None = None
    """Its epsilon; the run's own when not given."""
    dc_asgd: Literal["off", "constant", "adaptive"] = "off"
    """Delay compensation, as the server would chain it."""
    seed: int = 0
    """The network's init key; replay sampling draws from seed 1000 + seed, the delays
    from 2000 + seed (the same data and init for every optimizer setting of one seed)."""


def probe_frames(env_id: str) -> tuple[jnp.ndarray, int]:
    """160 stacked frames of uniformly random play (envpool seed 7) and the action count."""
    import envpool

    env = envpool.make(env_id, env_type="gymnasium", num_envs=PROBE_ENVS, seed=7)
    observations, _ = env.reset()
    rng = np.random.default_rng(0)
    kept = []
    for step in range(PROBE_STEPS):
        observations, *_ = env.step(rng.integers(0, env.action_space.n, PROBE_ENVS))
        if step % PROBE_EVERY == 0:
            kept.append(observations)
    env.close()
    return jnp.asarray(np.concatenate(kept)), int(env.action_space.n)


def dead_units_and_spread(network: NatureCNN, params, frames: jnp.ndarray) -> tuple[dict, float]:
    """Per hidden layer, the share of units positive on none of `frames`; the std over the
    frames of max_a Q."""
    values, state = network.apply(
        params, frames, capture_intermediates=True, mutable=["intermediates"]
    )
    captured = state["intermediates"]
    dead = {}
    for layer in HIDDEN_LAYERS:
        pre_activation = np.asarray(captured[layer]["__call__"][0])
        units = pre_activation.reshape(-1, pre_activation.shape[-1])
        dead[layer] = float(np.mean((units > 0).sum(axis=0) == 0))
    return dead, float(np.std(np.asarray(values).max(axis=-1)))


def newest_replay_checkpoint(config, bundle: int) -> Path:
    """The bundle's newest replay checkpoint file (a one-line error when there is none)."""
    from gorila_jax.bundle.replay_checkpoint import ReplayCheckpointer, replay_dir

    directory = replay_dir(Path(config.run_dir), bundle)
    found = ReplayCheckpointer(directory, keep=1, expect={}).checkpoints()
    if not found:
        raise cli.CommandLineError(f"no replay checkpoint for bundle {bundle} in {directory}")
    return found[-1]


def load_replay(config, bundle: int, num_actions: int):
    """The bundle's newest replay checkpoint, restored into an empty replay from a copy in a
    temporary directory: a restore moves aside what it cannot use and deletes leftover
    temporary files, and this probe never changes the run directory it reads."""
    from gorila_jax.bundle.replay_checkpoint import replay_dir, restore_replay
    from gorila_jax.core.replay import Replay

    newest = newest_replay_checkpoint(config, bundle)
    replay = Replay(
        capacity=config.replay_capacity, num_envs=config.num_envs, frame_shape=(84, 84),
        frame_dtype=np.uint8, stack_size=stack_size(config.env_id), n_step=config.n_step,
        gamma=config.gamma, num_actions=num_actions, seed=5,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        copy_dir = replay_dir(Path(scratch), bundle)
        copy_dir.mkdir(parents=True)
        shutil.copy2(newest, copy_dir / newest.name)
        copy_config = dataclasses.replace(config, run_dir=scratch)
        restore_replay(copy_config, replay, bundle=bundle, bundles=config.workers)
    if len(replay) < config.batch_size:
        raise cli.CommandLineError(f"{newest} could not be read into a replay of this run's layout")
    return replay


def experiment(args: StaleReplayArgs) -> int:
    """Train with the flags' settings and print a line per report."""
    if not 0 <= args.staleness_min <= args.staleness_max:
        raise cli.CommandLineError("--staleness-min and --staleness-max: need 0 <= min <= max")
    if args.updates < 1 or args.report_every < 1:
        raise cli.CommandLineError("--updates and --report-every must be >= 1")
    if not (args.run_dir / "config.yaml").is_file():
        raise cli.CommandLineError(f"no config.yaml in {args.run_dir} (is it a run directory?)")
    try:
        saved = load_run_yaml(args.run_dir / "config.yaml")
        learning_rate = saved.learning_rate if args.learning_rate is None else args.learning_rate
        config = validate(
            dataclasses.replace(
                saved,
                run_dir=str(args.run_dir),
                optimizer=args.optimizer or saved.optimizer,
                learning_rate=learning_rate,
                learning_rate_end=min(learning_rate, saved.learning_rate_end),
                optimizer_eps=(
                    saved.optimizer_eps if args.optimizer_eps is None else args.optimizer_eps
                ),
                dc_asgd=args.dc_asgd,
            )
        )
    except ConfigError as error:
        raise cli.CommandLineError(str(error)) from None
    if config.env_id in CARTPOLE_IDS:
        raise cli.CommandLineError(f"{args.run_dir} is a CartPole run; this probe needs Atari")
    if not 1 <= args.bundle <= config.workers:
        raise cli.CommandLineError(f"--bundle must be in 1..{config.workers}")
    if config.dueling or config.prioritized:
        raise cli.CommandLineError(
            f"{args.run_dir} is a dueling or prioritized-replay run; this probe trains the plain "
            "Nature CNN on uniform samples"
        )
    if not config.checkpoint_replay:
        raise cli.CommandLineError(f"{args.run_dir} saved no replay (checkpoint_replay off)")
    newest_replay_checkpoint(config, args.bundle)  # refused before any work when missing

    frames, num_actions = probe_frames(config.env_id)
    replay = load_replay(config, args.bundle, num_actions)
    replay.seed_sampling(1000 + args.seed)
    network = NatureCNN(num_actions)
    params = network.init(jax.random.key(args.seed), frames[:1])
    optimizer = config_optimizer(config, server=True)  # clipping is the bundle's, as here
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else None
    loss_fn = make_loss_fn(network, double_dqn=config.double_dqn, huber_delta=config.huber_delta)
    grad_step = jax.jit(jax.grad(loss_fn, has_aux=True))

    @jax.jit
    def apply(params, opt_state, grads, stale):
        if clip is not None:
            grads, _ = clip.update(grads, clip.init(grads))
        updates, opt_state = optimizer.update(grads, opt_state, params=params, stale_params=stale)
        return optax.apply_updates(params, updates), opt_state

    def report(update: int) -> None:
        dead, spread = dead_units_and_spread(network, params, frames)
        layers = ", ".join(f"{name} {share:.0%}" for name, share in dead.items())
        print(f"update {update}: q spread {spread:.3g}; dead units {layers}", flush=True)

    print(
        f"{config.optimizer} lr {config.learning_rate:g} eps {config.optimizer_eps:g} "
        f"dc_asgd {config.dc_asgd}, staleness {args.staleness_min}-{args.staleness_max}, "
        f"{len(replay):,} transitions of bundle {args.bundle}, seed {args.seed}",
        flush=True,
    )
    opt_state = optimizer.init(params)
    target = params
    history = collections.deque([params], maxlen=args.staleness_max + 1)
    delays = np.random.default_rng(2000 + args.seed)
    report(0)
    started = time.monotonic()
    for update in range(1, args.updates + 1):
        delay = int(delays.integers(args.staleness_min, args.staleness_max + 1))
        stale = history[max(0, len(history) - 1 - delay)]
        sample = replay.sample(config.batch_size)
        grads, _ = grad_step(stale, target, sample.transition, jnp.asarray(sample.weights))
        params, opt_state = apply(params, opt_state, grads, stale)
        history.append(params)
        if update % config.target_period == 0:
            target = params
        if update % args.report_every == 0:
            report(update)
    print(f"{args.updates} updates in {time.monotonic() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run; the exit status."""
    return cli.run(experiment, StaleReplayArgs, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
