"""Log records: one format that names the process and the level, one line per record."""

import logging
import subprocess
import sys

import pytest

from gorila_jax.io import logs


@pytest.fixture(autouse=True)
def undo_setup():
    yield
    logs.reset()


def test_a_record_names_the_process_and_the_level(capsys):
    logs.setup("bundle 2")
    log = logging.getLogger("gorila_jax.bundle.replay_checkpoint")
    log.warning("replay checkpoint replay-1.zip not written")
    log.info("resumed its replay")
    log.debug("not shown at INFO")
    log.error("it failed")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "[bundle 2] WARNING: replay checkpoint replay-1.zip not written",
        "[bundle 2] INFO: resumed its replay",
        "[bundle 2] ERROR: it failed",
    ]
    assert captured.out == ""


def test_setup_again_renames_and_never_doubles_a_line(capsys):
    root_handler = logging.StreamHandler(sys.stderr)  # as importing orbax installs one
    logging.getLogger().addHandler(root_handler)
    try:
        logs.setup("server")
        logs.setup("shard 1", level=logging.WARNING)
        log = logging.getLogger("gorila_jax.io.checkpoint")
        log.info("dropped below WARNING")
        log.warning("checkpoint 3 is unreadable")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().err.splitlines() == ["[shard 1] WARNING: checkpoint 3 is unreadable"]


def test_a_name_with_a_percent_sign_is_not_a_format():
    logs.setup("100% bundle")
    record = logging.LogRecord("gorila_jax", logging.WARNING, __file__, 1, "x %s", ("y",), None)
    assert logs.formatter("100% bundle").format(record) == "[100% bundle] WARNING: x y"


def test_before_setup_warnings_still_reach_stderr_and_info_does_not():
    code = (
        "import logging, gorila_jax.io.logs\n"
        "log = logging.getLogger('gorila_jax.io.checkpoint')\n"
        "log.info('quiet'); log.warning('checkpoint 2 is unreadable')\n"
        "gorila_jax.io.logs.setup('launcher'); log.warning('bundle 1 died')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "checkpoint 2 is unreadable",
        "[launcher] WARNING: bundle 1 died",
    ]
    assert result.stdout == ""
