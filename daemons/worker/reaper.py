"""The worker's reaper: ``python -m shoal.daemons.worker.reaper CGROUP_DIR...``.

Started by the worker with the read end of a pipe as stdin (see
:mod:`shoal.daemons.worker.isolation`). It reads lines ``+PGID`` (a task's
process group started) and ``-PGID`` (it ended) until EOF, which comes when
the worker exits or is killed. Then it kills every process in the task
cgroups (``task-*``) under each CGROUP_DIR and every process group still
listed, and exits. It runs as the worker's user, in its own session, so
neither the task user nor a signal to the worker's process group reaches it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from shoal.daemons.worker.isolation import kill_cgroup


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker's end of the pipe decides
    groups: set[int] = set()
    with os.fdopen(0, "rb", buffering=0) as pipe:
        buf = b""
        while chunk := pipe.read(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line[:1] in (b"+", b"-") and line[1:].isdigit():
                    (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for base in argv:
        for cg in Path(base).glob("task-*"):
            kill_cgroup(cg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
