"""What every experiment's small end-to-end test does: run a scenario, require every check held.

(The swarm, dispatch and telemetry tests repeat these lines; they could use this.)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from shoal.lab.experiment import Result, run_scenario
from shoal.lab.scenario import parse_scenario

root_only = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                               reason="the lab makes network namespaces: root only (CI runs as root)")


async def run_small(text: str, source: str, out: Path, timeout: float) -> tuple[Result, dict[str, Any]]:
    """Run the scenario in a fresh lab; (its result, its results.json) if every check held, else fail with
    each check and the end of the live progress."""
    echo = io.StringIO()
    with trio.fail_after(timeout):
        result = await run_scenario(parse_scenario(text, source=source), out, echo=echo)
    assert result.ok, "\n".join(f"{c.name}: {c.detail}" for c in result.checks) + "\n" + echo.getvalue()[-3000:]
    return result, json.loads((out / "results.json").read_text())
