"""The progress line: plain lines with every documented field off a terminal, redrawn on one."""

import io
import re

from gorila_jax.io.metrics import Progress, format_duration


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_line_has_the_documented_fields():
    stream = io.StringIO()
    progress = Progress(10_000, every=60, prefix="[bundle 1] ", stream=stream)
    assert not progress.maybe_print(
        frames=100, agent_steps=100, epsilon=0.5, mean_return=1.0, updates=3
    )
    progress.maybe_print(frames=4_000, agent_steps=1_000, epsilon=0.25, mean_return=-20.5,
                         updates=250, server_version=10, force=True)  # fmt: skip
    progress.maybe_print(frames=8_000, agent_steps=2_000, epsilon=0.125, mean_return=-19.0,
                         updates=500, server_version=60, force=True)  # fmt: skip
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    pattern = (
        r"\[bundle 1\] frames 8,000/10,000 \| sps [\d,]+ \| server [\d,]+ upd/s \| eps 0\.125"
        r" \| return\(recent\) -19\.00 \| updates 500 \| elapsed \d+s \| eta \S+"
    )
    assert re.fullmatch(pattern, lines[1]), lines[1]


def test_a_resumed_runs_first_rates_count_only_this_sitting():
    stream = io.StringIO()
    progress = Progress(10**6, every=60, stream=stream, start_frames=400_000,
                        start_agent_steps=100_000)  # fmt: skip
    progress._last_time -= 10
    progress.maybe_print(frames=400_400, agent_steps=100_100, epsilon=0.05, mean_return=0.0,
                         updates=0, force=True)  # fmt: skip
    line = stream.getvalue()
    assert " | sps 10 | " in line and " | eta 4h" in line, line


def test_terminal_line_is_redrawn_in_place():
    stream = FakeTerminal()
    progress = Progress(100, every=30, stream=stream)
    assert progress.every == 1.0
    progress.maybe_print(frames=50, agent_steps=50, epsilon=0.1, mean_return=0.0, updates=0,
                         force=False)  # fmt: skip
    progress._last_time -= 2
    progress.maybe_print(frames=60, agent_steps=60, epsilon=0.1, mean_return=0.0, updates=0)
    text = stream.getvalue()
    assert text.startswith("\r") and text.count("\r") == 1 and "\n" not in text


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3 * 3600 + 120) == "3h02m"
    assert format_duration(float("inf")) == "?"
