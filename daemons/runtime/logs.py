"""Logging to stderr, shaped for journald when systemd runs us.

Under systemd (``JOURNAL_STREAM`` is set and names our stderr) each line is
``<N>logger: message``: journald reads the ``<N>`` syslog priority prefix and
stamps the time itself. Run by hand, each line is
``2026-11-21T13:55:01.123Z LEVEL logger: message`` in UTC.

One record is one line: newlines inside a message are escaped as ``\\n``. A
traceback follows on extra lines, indented by hand runs, and under journald
each of its lines carries the prefix again (journald splits on newlines, and a
line without the prefix would lose its priority).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["setup_logging", "JournalFormatter", "ConsoleFormatter", "LEVELS"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}

# syslog(3) priorities
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _extra_lines(formatter: logging.Formatter, record: logging.LogRecord) -> list[str]:
    out: list[str] = []
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        out.extend(record.exc_text.splitlines())
    if record.stack_info:
        out.extend(formatter.formatStack(record.stack_info).splitlines())
    return out


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>{record.name}: "
        lines = [prefix + _escape(record.getMessage())]
        lines.extend(prefix + "  " + line for line in _extra_lines(self, record))
        return "\n".join(lines)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        head = f"{stamp}.{millis:03d}Z {record.levelname} {record.name}: {_escape(record.getMessage())}"
        return "\n".join([head] + ["    " + line for line in _extra_lines(self, record)])


def _is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    # systemd(1) recommends checking that the variable names *our* stderr: a
    # child whose stderr was redirected inherits the variable but not the stream.
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # not a real file (tests pass StringIO): trust the variable
    try:
        st = os.fstat(fd)
        dev, ino = value.split(":", 1)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(
    level: str, name: str, stream: TextIO | None = None, *, env: Mapping[str, str] | None = None
) -> logging.Logger:
    """Route all logging to ``stream`` (default stderr) at ``level``; idempotent.

    Returns the daemon's logger, ``shoal.<name>``. Calling it again (a reload
    that changes ``log_level``) replaces the handler instead of adding one.
    """
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if _is_journal(stream, env) else ConsoleFormatter())
    handler._shoal = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_shoal", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return logging.getLogger(f"shoal.{name}")


def set_level(level: str) -> None:
    """Change the level after a config reload."""
    logging.getLogger().setLevel(LEVELS[level.lower()])
