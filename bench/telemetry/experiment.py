"""The seed's experiment (Tables II/III, Fig. 2) at full size, results next to this script.

    .venv/bin/python bench/telemetry/experiment.py [options of `shoal telemetry experiment`]

Same as ``shoal telemetry experiment --out bench/telemetry``: prints the table and the
targets, writes experiment.json and f1_improvement.png/.svg here. Defaults: 70 nodes, 460
features, 13,000 windows per ordinary node, fractions 1 .. 1/16 (about 20-25 minutes
on 2 shared cores).

    .venv/bin/python bench/telemetry/experiment.py --replot

redraws the figures from the saved experiment*.json (seconds, no training):
f1_improvement.* from experiment.json, f1_improvement_budget_epochs.* from
experiment_budget_epochs.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shoal.lab.telemetry_experiment import main, write_figure

HERE = Path(__file__).parent


def replot() -> int:
    for name, stem in (("experiment", "f1_improvement"), ("experiment_budget_epochs", "f1_improvement_budget_epochs")):
        doc = json.loads((HERE / f"{name}.json").read_text())
        png, svg = write_figure(doc, HERE, stem)
        print(f"wrote {png} and {svg}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--replot"]:
        raise SystemExit(replot())
    raise SystemExit(main(["--out", str(HERE), *sys.argv[1:]]))
