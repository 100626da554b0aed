"""`shoal demo`, the README's first command, runs every part of the tour and passes.

Each part checks its own outcome (identical copies, a flagged fault, a rank
rebuilt bit for bit, a DAG done in order) and the demo exits non-zero if any
part fails, so this test is the tour's own verdict, run as a user runs it.
"""

import subprocess
import sys

from shoal.demo.tour import PARTS


def test_the_whole_tour_passes():
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "demo", "--size-mib", "16"],
                       capture_output=True, text=True, timeout=600)
    # A failed part's own output, whole (the tail alone cut the telemetry part's normal
    # windows off, and with them what a false alarm scored), then the stderr's tail.
    failed = [part for part in PARTS if f"=== {part}: ok ===" not in r.stdout]
    shown = "\n".join(_part_output(r.stdout, part)[-6000:] for part in failed)
    assert r.returncode == 0, shown + "\n" + r.stderr[-3000:]
    for part in PARTS:
        assert f"=== {part}: ok ===" in r.stdout, part


def _part_output(stdout: str, part: str) -> str:
    """The lines of ``stdout`` from the part's header to its verdict."""
    start = stdout.find(f"=== {part} ===")
    end = stdout.find(f"=== {part}:", start + 1)
    return stdout[start:end + 200] if start >= 0 else stdout[-4000:]


def test_an_unknown_part_is_refused_in_one_line():
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "demo", "--only", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown part nope" in r.stderr
