"""The reaper: removes a lab run whose own process died.

``Lab`` starts ``python -m shoal.lab.reaper RUN_ID`` in a session of its own
with a pipe on its stdin, and never writes to it. When the lab's process ends,
by any means (``kill -9`` included), the pipe closes and ``read`` returns. If
the run's record is still there, the lab did not tear it down itself: the
reaper does. Ctrl-C in the lab's terminal does not reach it (its own session).
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    (run_id,) = argv
    while sys.stdin.buffer.read(4096):
        pass
    from shoal.lab.lab import RUNS_DIR, teardown

    if (RUNS_DIR / f"{run_id}.json").exists():
        removed = teardown(run_id)
        print(f"shoal lab: run {run_id} lost its lab process; removed {len(removed)} namespaces and files",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
