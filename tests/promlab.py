"""A real Prometheus (Debian's /usr/bin/prometheus) for the tests, on the shipped rules.

``test_config(...)`` copies configs/prometheus/prometheus.yml and alerts.yml
into a directory, keeping every job name and target label as shipped, and
changes only what a test must: the targets (the daemons' real metrics
addresses), the intervals (1 s instead of 15 s) and the alerts' ``for:``
durations (``FOR_IN_TESTS`` instead of minutes; ``for: 0m`` stays 0m), so an
alert can go pending and fire within seconds. ``run_prometheus`` starts it on
127.0.0.1 with its TSDB in the test's tmp directory, waits for /-/ready and
kills it at the end. ``Prometheus.query`` and friends read the HTTP API; every
wait is a poll of that API bounded by the caller's ``trio.fail_after``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from shoal.daemons.runtime.config import ListenAddr

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
GRAFANA_DIR = ROOT / "configs" / "grafana"

#: What every alert's ``for:`` becomes in the test copy (a rule with ``for: 0m`` keeps it):
#: two evaluations at 1 s, so "pending, then firing" is still exercised.
FOR_IN_TESTS = "2s"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound, read, closed): for Prometheus itself, and for a
    daemon that must come back on the same address after a restart (a static scrape target)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise AssertionError(f"{name} is not installed: scripts/setup installs the Debian package 'prometheus'")
    return path


def lab_config(out: Path, targets: Mapping[str, Sequence[str]]) -> Path:
    """Write the test copy of prometheus.yml and alerts.yml into ``out``; returns prometheus.yml.

    ``targets`` maps each shipped job name to the host:port addresses to scrape.
    """
    out.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    doc["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    jobs = {job["job_name"] for job in doc["scrape_configs"]}
    assert set(targets) == jobs, f"targets for {sorted(targets)}, shipped jobs {sorted(jobs)}"
    for job in doc["scrape_configs"]:
        (static,) = job["static_configs"]  # as shipped: one group per job, with its labels
        static["targets"] = list(targets[job["job_name"]])
    (out / "prometheus.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and rule.get("for", "0m") not in ("0m", "0s", 0):
                rule["for"] = FOR_IN_TESTS
    (out / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    return out / "prometheus.yml"


@dataclass
class Prometheus:
    addr: ListenAddr
    process: trio.Process
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def api(self, path: str, **params: str) -> Any:
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        status, body = await http_get(self.addr.host, self.addr.port, target.encode())
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {status}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    async def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (raises PromQLError on a bad expression)."""
        data = await self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    async def targets(self) -> list[dict]:
        return (await self.api("/api/v1/targets", state="active"))["activeTargets"]

    async def rules(self) -> list[dict]:
        return [rule for group in (await self.api("/api/v1/rules"))["groups"] for rule in group["rules"]]

    async def alerts(self, name: str, state: str | None = None) -> list[dict]:
        """Active alerts called ``name`` (pending and firing), or only those in ``state``."""
        return [a for a in (await self.api("/api/v1/alerts"))["alerts"]
                if a["labels"]["alertname"] == name and (state is None or a["state"] == state)]

    async def until(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` (an async function) until it returns something truthy; the caller's
        fail_after bounds it. Returns that value."""
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(0.2)


class PromQLError(AssertionError):
    pass


async def http_get(host: str, port: int, target: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET http://host:port/target -> (status, body), in a thread (urllib speaks chunked
    encoding, which Prometheus uses for large answers). Connection errors raise OSError."""

    def get() -> tuple[int, bytes]:
        url = f"http://{host}:{port}{target.decode()}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - a loopback http URL
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await trio.to_thread.run_sync(get, abandon_on_cancel=True)


@asynccontextmanager
async def run_prometheus(config: Path, tmp: Path, timeout: float = 30.0) -> AsyncIterator[Prometheus]:
    port = free_port()
    log_path = tmp / "prometheus.log"
    argv = [
        tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=info",
    ]
    with log_path.open("wb") as log_file:  # a local file, opened once
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                                   stderr=subprocess.STDOUT)
    prom = Prometheus(ListenAddr("127.0.0.1", port), process, log_path)
    try:
        with trio.fail_after(timeout):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"prometheus exited with {process.returncode}:\n{prom.log[-4000:]}")
                try:
                    status, _ = await http_get("127.0.0.1", port, b"/-/ready", timeout=1.0)
                except OSError:
                    status = 0
                if status == 200:
                    break
                await trio.sleep(0.2)
        yield prom
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def check_metrics(text: str) -> str:
    """What ``promtool check metrics`` says about one /metrics page ("" when clean)."""
    proc = await trio.run_process([tool("promtool"), "check", "metrics"], stdin=text.encode(),
                                  capture_stdout=True, capture_stderr=True, check=False)
    return (proc.stdout + proc.stderr).decode().strip()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every panel target and template variable of every
    configs/grafana/*.json, with Grafana's variables replaced as test_ops does."""
    from tests.test_ops import grafana_to_promql

    out = []
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                out.append((path.stem, panel.get("title", ""), grafana_to_promql(target["expr"])))
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                import re

                q = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["query"]["query"])
                out.append((path.stem, f"variable ${var['name']}", grafana_to_promql(q)))
    return out
