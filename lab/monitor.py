"""The lab's monitor: Debian's Prometheus on the monitor host, scraping every daemon of the run.

It runs the bundle's ``monitor/prometheus.yml`` (the scrape config
``shoal lab render`` writes for a real LAN, with the shipped alert rules)
inside the monitor host's namespace, listening on that host's lab address.
After the experiment, :meth:`Prometheus.save` queries its HTTP API for the
series the experiment names and for ``ALERTS``, and writes them with the
results: what was scraped, and which alerts fired during the run.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

import trio

from shoal.lab.errors import LabError

__all__ = ["Prometheus", "PROMETHEUS_PORT"]

PROMETHEUS_PORT = 9090


class Prometheus:
    def __init__(self, lab: Any) -> None:  # a shoal.lab.lab.Lab (which imports this module)
        self.lab = lab
        self.host = lab.scenario.monitor.host
        self.address = lab.address(self.host)
        self.started = time.time()

    async def start(self) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise LabError("monitor.host is set but Debian's prometheus is not installed (apt-get install prometheus)")
        data = self.lab.workdir / "prometheus"
        data.mkdir()
        self.process = await self.lab.spawn(self.host, [
            exe, f"--config.file={self.lab.bundle.prometheus}", f"--storage.tsdb.path={data}",
            f"--web.listen-address={self.address}:{PROMETHEUS_PORT}", "--storage.tsdb.retention.time=1d",
        ], name="prometheus")
        with trio.move_on_after(30) as scope:
            while True:
                try:
                    await self.lab.http_get(self.host, self.address, PROMETHEUS_PORT, "/-/ready", timeout=2)
                    break
                except LabError:  # not listening yet
                    await trio.sleep(0.2)
        if scope.cancelled_caught:
            raise LabError(f"prometheus on {self.host} not ready in 30s (log {self.lab.workdir}/logs)")
        self.started = time.time()
        self.lab.progress(f"prometheus on {self.host} at {self.address}:{PROMETHEUS_PORT}")

    async def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        body = await self.lab.http_get(self.host, self.address, PROMETHEUS_PORT, f"/api/v1/{path}?{query}")
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise LabError(f"prometheus: {path}: {doc.get('error', doc)}")
        return doc["data"]

    async def targets_up(self) -> dict[str, bool]:
        """``job/instance -> up`` for every target of the scrape config."""
        data = await self.api("query", query="up")
        return {f"{r['metric']['job']}/{r['metric'].get('host', r['metric']['instance'])}": r["value"][1] == "1"
                for r in data["result"]}

    async def range(self, expr: str, *, step: float | None = None) -> list[dict]:
        """``expr`` over the run, one point per scrape (the scrape interval is the default step)."""
        step = step or self.lab.scenario.monitor.scrape_interval
        end = time.time()
        data = await self.api("query_range", query=expr, start=f"{self.started:.3f}", end=f"{end:.3f}",
                              step=f"{step:g}")
        return data["result"]

    async def fired(self) -> list[str]:
        """The alerts that were firing at any moment of the run."""
        rows = await self.range('ALERTS{alertstate="firing"}')
        return sorted({r["metric"]["alertname"] for r in rows})

    async def save(self, out: Path, series: dict[str, str]) -> dict[str, Any]:
        """Write ``prometheus.json``: each named series over the run, the targets' state and the alerts fired."""
        saved: dict[str, Any] = {"series": {}, "alerts_fired": await self.fired(),
                                 "targets_up": await self.targets_up()}
        for name, expr in series.items():
            saved["series"][name] = {"expr": expr, "result": await self.range(expr)}
        (out / "prometheus.json").write_text(json.dumps(saved))
        return saved
