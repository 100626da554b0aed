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
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for part in PARTS:
        assert f"=== {part}: ok ===" in r.stdout, part


def test_an_unknown_part_is_refused_in_one_line():
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "demo", "--only", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown part nope" in r.stderr
