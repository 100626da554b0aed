"""What dispatcher, workers and the CLI share: token files and the result encoding.

A worker reports a batch of unit outcomes with ``report``; each task result
travels as a list ``[task, exit_code, started, finished, error, stdout,
stderr, outputs]`` (compact for batches of thousands). :func:`decode_results`
checks every field and raises ``ValueError`` naming what is wrong, which the
dispatcher answers as ``bad_request``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.daemons.dispatcher.store import TaskResult
from shoal.daemons.runtime.config import ConfigError

__all__ = ["read_token", "encode_result", "decode_results"]

MIN_TOKEN = 16


def read_token(path: Path | None, source: str = "token_file") -> bytes | None:
    """The HMAC token in ``path`` (surrounding whitespace stripped), or None."""
    if path is None:
        return None
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(str(path), source, f"cannot read: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN:
        raise ConfigError(str(path), source, f"the token must be at least {MIN_TOKEN} bytes")
    return token


def encode_result(r: TaskResult) -> list[Any]:
    return [r.task, r.exit_code, r.started, r.finished, r.error, r.stdout, r.stderr, r.outputs or []]


def decode_results(raw: Any, max_log_bytes: int) -> list[tuple[str, list[TaskResult]]]:
    if not isinstance(raw, list):
        raise ValueError("results: expected a list")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
            raise ValueError("results: expected [unit key, [task results]] pairs")
        key, rows = item
        results = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 8):
                raise ValueError(f"{key}: a task result has 8 fields")
            task, code, started, finished, error, stdout, stderr, outputs = row
            if (not isinstance(task, str) or not (code is None or isinstance(code, int))
                    or not all(isinstance(t, (int, float)) for t in (started, finished))
                    or not isinstance(error, str) or not isinstance(stdout, bytes) or not isinstance(stderr, bytes)
                    or not isinstance(outputs, list)):
                raise ValueError(f"{key}: a task result has a field of the wrong type")
            results.append(TaskResult(task, code, float(started), float(finished), error[:4096],
                                      stdout[:max_log_bytes], stderr[:max_log_bytes], outputs[:64]))
        out.append((key, results))
    return out
