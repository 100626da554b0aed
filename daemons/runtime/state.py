"""Durable files under the daemon's state directory, written atomically.

``atomic_write`` writes a temporary file in the same directory, fsyncs it,
renames it over the target and fsyncs the directory, so after a crash at any
moment the file holds either the old contents or the new, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateSaver:
    """The one periodic state saver: a snapshot on the event loop, the write off it.

    ``snapshot()`` runs in the trio thread (it reads the daemon's live state,
    so it must not race with handlers) and returns the bytes to keep, or None
    when nothing changed. The write is :func:`atomic_write` in a worker
    thread. Every outcome is counted in ``shoal_<daemon>_state_saves_total
    {what, result}`` (both results exist at 0 from the start, so a first
    failure shows in ``increase()``), and a failure is logged once per run of
    failures with the path and reason. :meth:`save_now` is the same save,
    synchronous, for the final save at stop; it returns whether it succeeded,
    so the caller never logs "saved" after a failure.

    The period is honoured exactly: :meth:`run` sleeps ``interval`` between
    saves whatever else the daemon does on its housekeeping tick.
    """

    def __init__(self, what: str, path: Path, snapshot, interval: float, *, metrics=None, log=None) -> None:
        import logging

        self.what = what
        self.path = path
        self.snapshot = snapshot
        self.interval = interval
        self.log = log or logging.getLogger("shoal.state")
        self.failing = False
        self._lock: Any = None  # a trio.Lock, made by the first save()
        self._counter = None
        if metrics is not None:
            self._counter = metrics.state_saves
            for result in ("ok", "error"):
                self._counter.labels(what=what, result=result)

    def _write(self, blob: bytes) -> bool:
        try:
            atomic_write(self.path, blob)
        except OSError as exc:
            if not self.failing:
                self.log.error("cannot save %s to %s: %s", self.what, self.path, exc.strerror or exc)
            self.failing = True
            self._count("error")
            return False
        if self.failing:
            self.log.info("saving %s to %s works again", self.what, self.path)
        self.failing = False
        self._count("ok")
        return True

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(what=self.what, result=result).inc()

    def save_now(self) -> bool:
        """Snapshot and write now, in this thread; True if the state is on disk."""
        blob = self.snapshot()
        return True if blob is None else self._write(blob)

    async def save(self) -> bool:
        """Snapshot on the event loop and write in a worker thread, one save at a time (so the
        newest snapshot is the one left on disk); True if the state is on disk."""
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            blob = self.snapshot()
            return True if blob is None else await trio.to_thread.run_sync(self._write, blob)

    async def run(self) -> None:
        """Save every ``interval`` seconds until cancelled."""
        import trio

        while True:
            await trio.sleep(self.interval)
            await self.save()
