"""Logging for every process of a run: one format that names the process and the level.

Why: a run is several processes (the parameter server or its shards, the bundles, the local
launcher) whose output ends up merged: the local launcher forwards every child's stdout and
stderr as one stream, and SLURM writes every task into one file. So warnings, errors and a
role's one-off notes ("resumed its replay from ...") go through the standard `logging`
module with one format,

    [<process>] <LEVEL>: <message>        e.g.  [bundle 2] WARNING: replay checkpoint ...

and such a log can be filtered: `grep WARNING`, `grep -E 'WARNING|ERROR'`, `grep '^\\[server\\]'`.
The bracketed name comes first because the local launcher prefixes a child's line with
`[<name>]` only when the line does not already start with it: a record of `bundle 2` passes
through unchanged. Every line of a record after its first (a traceback) gets the launcher's
prefix instead, so it can still be told apart.

Use: a module logs through `logging.getLogger(__name__)` (every module's logger is below the
`gorila_jax` one); a process calls `setup(name)` once it knows its role ("server",
"bundle 3", "launcher", "single process", "shard 1"). Records go to stderr (whatever
`sys.stderr` is when they are written). `setup` is idempotent: a later call renames the
process or changes the level, never adds a second handler. It stops the records from also
reaching the root logger, which some libraries give a handler of their own (importing orbax
does), so that no line is written twice.

Before `setup` (library use, tests) nothing is configured here: records go up to the root
logger, so warnings and errors are still written to stderr (through the root's handler, else
logging's last-resort handler, without the process name) and pytest's `caplog` sees them;
INFO records are dropped (the root's level is WARNING).

The live progress line ("frames .../... | sps ...", `metrics.Progress`) is not a log record:
it stays a print, so that it can redraw itself in place on a terminal.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "gorila_jax"
"""The logger every module's logger is below (`logging.getLogger(__name__)`)."""

FORMAT = "[{process}] %(levelname)s: %(message)s"
"""The one format: the process's name in brackets, the level, the message."""


class _Stderr(logging.StreamHandler):
    """A stream handler that writes to `sys.stderr` as it is when a record is written (a
    redirect, pytest's capture), like logging's last-resort handler."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.setStream; always the current stderr
        pass


def formatter(process: str) -> logging.Formatter:
    """The format of `process`'s records: `[process] LEVEL: message`."""
    return logging.Formatter(FORMAT.format(process=process.replace("%", "%%")))


def setup(process: str, level: int | str = logging.INFO) -> logging.Logger:
    """Make this process's `gorila_jax` records `[process] LEVEL: message` lines on stderr,
    from `level` up; returns the `gorila_jax` logger. Call it once the process knows its
    role; calling it again only renames the process or changes the level."""
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        logger.addHandler(handler)
    handler.setFormatter(formatter(process))
    logger.setLevel(level)
    logger.propagate = False  # the root may have a handler of its own: one line per record
    return logger


def reset() -> None:
    """Undo `setup` (for tests): no handler of ours, level unset, records go to the root."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
