"""One command-line style for every entry point: a typed dataclass parsed by tyro.

Training (`gorila_jax.core.config.Config`), evaluation, plotting, the DC-ASGD delay experiment and
every benchmark describe their flags as a dataclass whose field docstrings are the `--help`
text. tyro reports a bad command line in a multi-line box; :func:`parse` turns it into one
line (:class:`CommandLineError`), so every program refuses bad input the same way: one line
naming what is wrong, exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from typing import TypeVar

import tyro

T = TypeVar("T")


class CommandLineError(ValueError):
    """A command line that cannot be parsed or a value that breaks a rule; one line."""


def parse(
    cls: type[T],
    args: Sequence[str] | None = None,
    *,
    default: T | None = None,
    description: str | None = None,
) -> T:
    """Parse `args` (default: sys.argv[1:]) into `cls`; `--help` prints and exits 0.

    Raises CommandLineError with tyro's first message on one line for an unknown flag, a
    missing argument or a value of the wrong type.
    """
    args = list(sys.argv[1:] if args is None else args)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return tyro.cli(cls, default=default, args=args, description=description)
    except SystemExit as done:
        text = captured.getvalue()
        if not done.code:
            sys.stdout.write(text)
            raise
        raise CommandLineError(first_message(text)) from None


def first_message(text: str) -> str:
    """The first message inside tyro's error box, joined onto one line."""
    parts = []
    for line in text.splitlines()[1:]:
        content = line.strip().strip("│╭╮╰╯").strip()
        if not content or set(content) <= set("─━-"):
            if parts:
                break
            continue
        parts.append(content)
    return " ".join(parts) or "invalid command line"


def fail(message: str) -> int:
    """Print a refusal as the one line every program uses (`error: <message>` on stderr)
    and return the exit status that goes with it, 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def run(main, cls: type[T], args: Sequence[str] | None = None, description: str | None = None):
    """Parse `cls` from the command line and call `main(parsed)`; its exit status.

    A CommandLineError, from parsing or raised by `main` for a bad value, is printed as
    `error: <message>` on stderr with exit status 2.
    """
    try:
        return main(parse(cls, args, description=description))
    except CommandLineError as error:
        return fail(str(error))
