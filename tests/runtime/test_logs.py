"""Log line formats, for the journal and for a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest

from shoal.daemons.runtime.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_console_format_is_one_line_per_record_with_a_utc_timestamp():
    out = io.StringIO()
    log = setup_logging("info", "tracker", out, env={})
    log.info("hello %s", "two\nlines")
    log.debug("hidden")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO shoal\.tracker: hello two\\nlines", lines[0])
    assert re.fullmatch(r"\S+Z ERROR shoal\.tracker: failed", lines[1])
    assert all(line.startswith("    ") for line in lines[2:]) and "ValueError: boom" in lines[-1]


def test_journal_format_has_the_priority_prefix_on_every_line():
    out = io.StringIO()
    log = setup_logging("debug", "peer", out, env={"JOURNAL_STREAM": "8:1234"})
    log.debug("d")
    log.warning("w\nx")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("e")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["<7>shoal.peer: d", "<4>shoal.peer: w\\nx", "<3>shoal.peer: e"]
    assert len(lines) > 4 and all(line.startswith("<3>shoal.peer:   ") for line in lines[3:])


def test_journal_stream_naming_another_file_is_ignored(tmp_path):
    with open(tmp_path / "log", "w") as f:
        setup_logging("info", "x", f, env={"JOURNAL_STREAM": "1:1"})
        logging.getLogger("shoal.x").info("plain")
    assert not (tmp_path / "log").read_text().startswith("<")


def test_idempotent():
    out = io.StringIO()
    setup_logging("info", "a", out, env={})
    log = setup_logging("warning", "a", out, env={})
    log.warning("once")
    log.info("filtered")
    assert len(out.getvalue().splitlines()) == 1
    with pytest.raises(ValueError):
        setup_logging("loud", "a", out, env={})
