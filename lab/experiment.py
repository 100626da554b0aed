"""``shoal lab run``: bring a scenario's lab up, run its experiment, save the results, tear it down.

An experiment is a module named in :data:`shoal.lab.scenario.EXPERIMENTS` with

* ``Params``: a frozen dataclass, the schema of ``[experiment.params]``;
* ``async def run(lab, params) -> Result``.

It runs with the lab up and every daemon ready; the fault schedule starts
with it. It returns a :class:`Result`: rows for the summary table, the
correctness checks (each held or not, with what was seen), a JSON-able record
and the plots it wrote into ``lab.out``. ``shoal lab run`` exits 0 only if every
check held.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from shoal.lab.lab import Lab, LabError
from shoal.lab.scenario import EXPERIMENTS, Scenario

__all__ = ["Check", "Result", "run_scenario", "format_table"]


@dataclass
class Check:
    name: str
    held: bool
    detail: str


@dataclass
class Result:
    #: the summary table: one dict per row, the same keys in every row
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    #: everything measured, for results.json
    data: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    #: Prometheus series to save with the results: name -> PromQL
    series: dict[str, str] = field(default_factory=dict)

    def check(self, name: str, held: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(held), detail))
        return bool(held)

    @property
    def ok(self) -> bool:
        return all(c.held for c in self.checks)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


async def run_scenario(scenario: Scenario, out: Path, *, echo: TextIO = sys.stdout) -> Result:
    """Run the scenario's experiment in a fresh lab; write ``out/results.json`` and ``out/summary.txt``."""
    if scenario.experiment.kind == "none":
        raise LabError(f"{scenario.source}: experiment.kind: \"none\" has nothing to run (use `shoal lab up`)")
    module = importlib.import_module(EXPERIMENTS[scenario.experiment.kind])
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- a local directory, before any task runs
    started = time.time()
    async with Lab(scenario, out=out, echo=echo) as lab:
        lab.start_experiment()
        with trio.move_on_after(scenario.experiment.timeout) as scope:
            result: Result = await module.run(lab, scenario.params)
        if scope.cancelled_caught:
            raise LabError(f"the {scenario.experiment.kind} experiment did not finish in "
                           f"{scenario.experiment.timeout:g}s (experiment.timeout)")
        for (host, daemon), p in lab.daemons.items():
            unexpected = [code for _, code in p.exits]
            # lab.applied: the schedule's faults and those the experiment applied itself
            if unexpected and not any(f["kind"] in ("kill", "host-down") and f["host"] == host
                                      for f in lab.applied) and host not in lab.down_hosts:
                result.check(f"{host}/{daemon} kept running", False,
                             f"exited {len(unexpected)} times with no fault scheduled (codes {unexpected})")
        prom: dict[str, Any] = {}
        if lab.prometheus is not None:
            prom = await lab.prometheus.save(out, result.series)
            result.data["alerts_fired"] = prom["alerts_fired"]
            down = sorted(t for t, up in prom["targets_up"].items() if not up)
            result.data["targets_down_at_end"] = down
        record = {
            "scenario": scenario.source, "run_id": lab.run_id, "started": started, "seconds": time.time() - started,
            "params": _jsonable(scenario.params), "faults": lab.applied,
            "restarts": {f"{h}/{d}": p.starts - 1 for (h, d), p in lab.daemons.items() if p.starts > 1},
            "checks": [_jsonable(c) for c in result.checks], "rows": result.rows,
            "plots": [str(p) for p in result.plots], "data": _jsonable(result.data),
        }
    (out / "results.json").write_text(json.dumps(record, indent=1))
    summary = [format_table(result.rows), ""]
    summary += [f"{'held  ' if c.held else 'FAILED'}  {c.name}: {c.detail}" for c in result.checks]
    if prom:
        summary.append(f"alerts fired during the run: {', '.join(prom['alerts_fired']) or 'none'}")
    summary += [f"plot: {p}" for p in result.plots]
    summary.append(f"results: {out / 'results.json'}")
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary), file=echo, flush=True)
    return result
