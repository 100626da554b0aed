"""The seed's experiment (Tables II/III, Fig. 2) at full size, results next to this script.

    .venv/bin/python bench/telemetry/experiment.py [options of `shoal telemetry experiment`]

Same as ``shoal telemetry experiment --out bench/telemetry``: prints the table and the
targets, writes experiment.json and f1_improvement.svg here. Defaults: 70 nodes, 460
features, 13,000 windows per ordinary node, fractions 1 .. 1/16 (about 20-25 minutes
on 2 shared cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.lab.telemetry_experiment import main

if __name__ == "__main__":
    raise SystemExit(main(["--out", str(Path(__file__).parent), *sys.argv[1:]]))
