"""Entry point of every run: it gives this process its role.

`main` parses the config, then:
- `--join RUN_DIR`: becomes one more bundle of the job running there
  (`gorila_jax.bundle.process.run_joining_bundle`);
- `--single-process`: trains here (`gorila_jax.run.single_process`);
- started by hand without SLURM: becomes the local launcher (`gorila_jax.run.launcher`),
  which starts the server's shards and the bundles as copies of this program;
- started by srun or by the local launcher: joins the run (`wire.rendezvous`) and plays
  its role: S of them the parameter server's shards (`--server-shards`, default 1,
  `gorila_jax.server.process`), spread over the hosts (`wire.placement`: processes 0..S-1
  on one host), every other process a bundle (`gorila_jax.bundle.process`); with
  `--mode sync`, every process a bundle of the synchronous run
  (`gorila_jax.run.sync_process`).

A bad config, a refused checkpoint or a run directory that cannot be used ends the
program with one line on stderr and exit status 2, before anything is started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from gorila_jax.bundle.client import ServerError
from gorila_jax.core.cli import fail
from gorila_jax.core.config import Config, ConfigError, parse_cli
from gorila_jax.io import logs
from gorila_jax.io.checkpoint import CheckpointError
from gorila_jax.io.files import make_private_dir, owner_only_files
from gorila_jax.run import launcher
from gorila_jax.wire import rendezvous
from gorila_jax.wire.join_file import JoinError

log = logging.getLogger(__name__)


def main(default: Config, *, description: str | None = None, args: list[str] | None = None) -> int:
    """Run the program described by the command line; returns the exit status."""
    argv = sys.argv[1:] if args is None else list(args)
    config = parse_cli(default, argv, description=description)
    # Params, replays and keys live in the run directory: it and all that every role (and
    # every process this one starts, which inherits the umask) writes there are the
    # owner's alone.
    previous_umask = owner_only_files()
    try:
        if config.join:  # its run directory is the job's: --run-dir plays no part
            from gorila_jax.bundle.process import run_joining_bundle

            logs.setup("joining bundle")
            stop = stop_on_signals()
            run_joining_bundle(config, default, stop)
            return launcher.EXIT_STOPPED if stop.is_set() else 0
        try:
            make_private_dir(Path(config.run_dir), create=False)
        except OSError as error:
            return fail(f"run directory {config.run_dir}: {error.strerror}")
        if config.single_process:
            from gorila_jax.run.single_process import train

            stop = stop_on_signals()
            train(config, stop)
            return launcher.EXIT_STOPPED if stop.is_set() else 0
        if rendezvous.detect_launcher() == "none":
            return launcher.launch_local(config, argv)
        return run_role(config)
    except (
        ConfigError, MemoryError, CheckpointError, rendezvous.RendezvousError, JoinError
    ) as error:  # fmt: skip
        return fail(str(error))
    except ServerError as error:  # the server is lost for good, or refused this process
        # One line naming what is gone (under SLURM its task and host), and status 1: not
        # a configuration error, so the local launcher restarts the process as for a
        # crash, and `srun --kill-on-bad-exit=1` ends the step.
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        os.umask(previous_umask)


def stop_on_signals() -> threading.Event:
    """SIGTERM / SIGINT set the returned event, so loops end cleanly."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_role(config: Config) -> int:
    """Join the run and be one of its parameter-server shards, one of its aggregators
    (`--aggregate-per-host`) or one of its bundles, as the placement says (every process
    a bundle, in sync mode); process 0 logs where every role landed."""
    from gorila_jax.server.process import check_server_files, check_shard_layout

    stop = stop_on_signals()
    if rendezvous.ENV_LAUNCHER_PID in os.environ:
        launcher.die_with_launcher(int(os.environ[rendezvous.ENV_LAUNCHER_PID]), stop)
    sync = config.mode == "sync"
    info = rendezvous.initialize(collectives=sync)
    keys = rendezvous.run_keys(info, Path(config.run_dir))
    if sync:
        from gorila_jax.run.sync_process import run_sync

        logs.setup(f"bundle {info.index + 1}")  # no server: every process a bundle
        return run_sync(config, info, keys, stop)
    shards = config.server_shards
    if info.count <= shards:
        logs.setup(f"process {info.index}")
        return fail(
            f"a Gorila run needs its {shards} server process(es) and at least one bundle, "
            f"and {info.count} process(es) were started; use srun -n {shards + 2} or more, "
            "or --single-process"
        )
    if config.max_bundles and config.max_bundles < info.count - shards:
        logs.setup(f"process {info.index}")
        return fail(
            f"config.max_bundles: must be at least the {info.count - shards} bundles "
            f"started, got {config.max_bundles}"
        )
    try:
        placement = rendezvous.place_roles(info, shards, keys, aggregate=config.aggregate_per_host)
    except ValueError as error:
        logs.setup(f"process {info.index}")
        return fail(str(error))
    logs.setup(launcher.process_name(placement, info.index))
    if info.index == 0:
        log.info(f"roles: {placement.describe()}")
    if shards > 1:
        check_shard_layout(config)
    # Every process, before the rendezvous: all of them stop with the one line at once.
    check_server_files(Path(config.run_dir), shards)
    if placement.shard_of(info.index) is not None:
        from gorila_jax.server.process import run_server

        run_server(config, info, placement, keys, stop)
    elif placement.aggregator_of(info.index) is not None:
        from gorila_jax.aggregator.process import run_aggregator

        run_aggregator(config, info, placement, keys, stop)
    else:
        from gorila_jax.bundle.process import run_bundle

        run_bundle(config, info, placement, keys, stop)
    return launcher.EXIT_STOPPED if stop.is_set() else 0
