"""Operations packaging: systemd units, default configs, Prometheus rules, Grafana.

These run the real checkers (systemd-analyze, systemd-sysusers, promtool). A
missing checker is a failure that names the Debian package `.ci/run` must
install, never a skip: a check that silently does not run is no check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shoal.cli.main import build_parser
from shoal.daemons.peer.config import PeerConfig
from shoal.daemons.peer.metrics import PeerMetrics
from shoal.daemons.runtime import registry as systemd_registry
from shoal.daemons.runtime import systemd
from shoal.daemons.runtime.config import load_config
from shoal.daemons.runtime.metrics import runtime_metrics
from shoal.daemons.runtime.registry import DAEMONS as CLI_DAEMONS
from shoal.daemons.tracker.config import TrackerConfig
from shoal.daemons.tracker.metrics import TrackerMetrics

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = ROOT / "systemd"
CONFIGS = ROOT / "configs"
PROMETHEUS = CONFIGS / "prometheus"
GRAFANA = CONFIGS / "grafana"

MAX_EXPOSURE = 2.0
TOOL_PACKAGES = {"systemd-analyze": "systemd", "systemd-sysusers": "systemd", "promtool": "prometheus"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: .ci/run must install the Debian package "
            f"{TOOL_PACKAGES[name]!r} (apt-get install -y {TOOL_PACKAGES[name]})"
        )
    return path


def run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def shoal_exe(tmp_path: Path) -> str:
    """The venv's real `shoal` script; a stub only if it is not installed.

    systemd-analyze verify checks that ExecStart= names an executable file;
    what the file does is not under test here.
    """
    real = Path(sys.executable).parent / "shoal"
    if real.is_file() and os.access(real, os.X_OK):
        return str(real)
    stub = tmp_path / "bin" / "shoal"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.fixture
def rendered(tmp_path: Path, shoal_exe: str) -> dict[str, Path]:
    out = tmp_path / "units"
    out.mkdir()
    paths = {}
    for name, text in systemd.render_units(shoal_exe).items():
        (out / name).write_text(text)
        paths[name] = out / name
    return paths


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, by key, comments and sections ignored."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# -- systemd units -------------------------------------------------------------


def verify_complaints(paths: list[Path]) -> list[str]:
    """What ``systemd-analyze verify`` says about ``paths``.

    It exits 0 after a bad value or an unknown key (it logs "..., ignoring"),
    and 1 only for some errors (ExecStart= not executable), so every line of
    its stderr that names one of our files counts.
    """
    proc = run([tool("systemd-analyze"), "verify", "--man=no", *map(str, paths)])
    ours = {p.name for p in paths} | {str(p.parent) for p in paths}
    lines = [line for line in proc.stderr.splitlines() if any(name in line for name in ours)]
    if proc.returncode != 0:
        lines.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return lines


@pytest.mark.systemd
def test_rendered_units_pass_systemd_analyze_verify(rendered: dict[str, Path]) -> None:
    assert verify_complaints(list(rendered.values())) == []


@pytest.mark.systemd
def test_verify_check_catches_a_broken_unit(rendered: dict[str, Path]) -> None:
    # The check above is only worth something if a broken unit fails it.
    service = rendered["shoal-tracker.service"]
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    assert any("ProtectSystem" in line or "protect system" in line for line in verify_complaints([service]))


def exposure(path: Path) -> float:
    proc = run([tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(path)])
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure level in systemd-analyze output:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


@pytest.mark.systemd
def test_every_service_unit_is_sandboxed(rendered: dict[str, Path]) -> None:
    services = [p for name, p in rendered.items() if name.endswith(".service")]
    assert services
    scores = {p.name: exposure(p) for p in services}
    assert all(score <= MAX_EXPOSURE for score in scores.values()), scores


def test_committed_units_are_the_renderer_output() -> None:
    expected = systemd.render_units(systemd.DEFAULT_EXE, config_dir=systemd.DEFAULT_CONFIG_DIR)
    committed = {p.name for p in SYSTEMD_DIR.iterdir() if p.suffix in (".service", ".target")}
    assert committed == set(expected), "regenerate: python -m shoal.daemons.runtime.systemd systemd/"
    for name, text in expected.items():
        assert (SYSTEMD_DIR / name).read_text() == text, (
            f"systemd/{name} drifted from the renderer; "
            "regenerate: python -m shoal.daemons.runtime.systemd systemd/"
        )


def test_units_match_how_the_daemons_run() -> None:
    units = systemd.render_units("/opt/shoal/bin/shoal", config_dir="/srv/shoal/etc")
    parser = build_parser()
    for d in systemd.DAEMONS.values():
        assert d.name in CLI_DAEMONS, f"{d.name}: no `shoal {d.name}` command"
        s = unit_settings(units[d.unit])
        (exec_start,) = s["ExecStart"]
        argv = exec_start.split()
        assert argv[0] == "/opt/shoal/bin/shoal"
        args = parser.parse_args(argv[1:])
        assert (args.daemon, args.config) == (d.name, f"/srv/shoal/etc/{d.config_file}")
        assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
        assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert s["WantedBy"] == ["shoal.target"] and s["PartOf"] == ["shoal.target"]
        assert s["StateDirectory"] == [f"shoal-{d.name}"]
        # The daemon pings at half of WatchdogSec; stop must outlast stop_timeout.
        assert int(s["WatchdogSec"][0]) >= 10
        schema = CLI_DAEMONS[d.name].load_schema()
        assert float(s["TimeoutStopSec"][0]) >= schema().daemon.stop_timeout + 3
        assert not [k for k, v in s.items() if len(v) > 1 and k != "SystemCallFilter"], "duplicate keys"
    assert "WantedBy=multi-user.target" in units["shoal.target"]


def test_table_overrides_replace_or_append_service_settings() -> None:
    row = systemd.DaemonUnit(
        "example",
        "Example",
        service=(
            ("ProcSubset", "all", "reads /proc/stat"),
            ("SystemCallFilter", "@system-service", "needs sched_setaffinity"),
            ("MemoryDenyWriteExecute", None, "a JIT"),
            ("LimitMEMLOCK", "64M", "locks buffers"),
        ),
    )
    s = unit_settings(systemd._render_service(row, "/usr/bin/shoal", "/etc/shoal"))
    assert s["ProcSubset"] == ["all"]
    assert s["SystemCallFilter"] == ["@system-service"]
    assert "MemoryDenyWriteExecute" not in s
    assert s["LimitMEMLOCK"] == ["64M"]
    with pytest.raises(ValueError):
        bad = systemd.DaemonUnit("example", "Example", service=(("NoSuchKey", None, "x"),))
        systemd._render_service(bad, "/usr/bin/shoal", "/etc/shoal")


@pytest.mark.parametrize("exe", ["shoal", "/opt/my shoal/bin/shoal", "/opt/$HOME/shoal", "/opt/100%/shoal"])
def test_render_refuses_paths_that_need_escaping(exe: str) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        systemd.render_units(exe)


@pytest.mark.systemd
def test_sysusers_snippet_creates_the_shoal_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSTEMD_DIR / systemd.SYSUSERS_FILE)])
    assert proc.returncode == 0 and "ignoring" not in proc.stderr, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^shoal:x:\d+:\d+:Shoal cluster daemons:/:/usr/sbin/nologin$", passwd, re.M), passwd
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^shoal-submit:x:\d+:$", group, re.M), group  # the dispatcher's default submit_groups


@pytest.mark.parametrize("where", ["tmp", "root", "home"])
def test_install_refuses_an_executable_the_sandbox_hides(tmp_path: Path, where: str) -> None:
    # Before: `shoal systemd install` wrote ExecStart=/tmp/.../shoal without a word, and every unit
    # then failed with status=203/EXEC under ProtectHome=/PrivateTmp=.
    script = tmp_path / "shoal"
    interpreter = {"tmp": "/usr/bin/python3", "root": "/root/.venv/bin/python", "home": "/home/u/venv/bin/python"}
    script.write_text(f"#!{interpreter[where]}\nprint('hi')\n")
    with pytest.raises(systemd.UnusableExecutable, match="203/EXEC"):
        systemd.check_executable(str(script))
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "systemd", "install", "--shoal-exe", str(script),
                        "--unit-dir", str(tmp_path / "units"), "--config-dir", str(tmp_path / "etc")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ProtectHome=yes" in r.stderr or "PrivateTmp=yes" in r.stderr
    assert not (tmp_path / "units").exists()
    systemd.check_executable("/usr/bin/env")  # a binary outside the hidden trees is fine


def test_install_writes_units_and_keeps_edited_configs(tmp_path: Path, shoal_exe: str) -> None:
    units, etc, sysusers = tmp_path / "system", tmp_path / "etc" / "shoal", tmp_path / "sysusers.d"
    written = systemd.install(units, shoal_exe=shoal_exe, config_dir=etc, sysusers_dir=sysusers, check_exe=False)
    config = etc / "tracker.toml"
    configs = {etc / d.config_file for d in systemd.DAEMONS.values()}
    assert config in configs
    expected_units = systemd.render_units(shoal_exe, config_dir=str(etc))
    assert set(written) == {units / n for n in expected_units} | configs | {sysusers / "shoal.conf"}
    for name, text in expected_units.items():
        assert (units / name).read_text() == text
        assert (units / name).stat().st_mode & 0o777 == 0o644
    for d in systemd.DAEMONS.values():
        assert f"--config {etc}/{d.config_file}" in (units / d.unit).read_text()
        assert (etc / d.config_file).read_text() == (CONFIGS / d.config_file).read_text()
        # The daemon's unprivileged user reads it.
        assert (etc / d.config_file).stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.rglob(".*.tmp"))

    config.write_text("# edited by the operator\n")
    again = systemd.install(units, shoal_exe=shoal_exe, config_dir=etc, check_exe=False)
    assert config not in again and config.read_text() == "# edited by the operator\n"
    assert set(again) == {units / n for n in expected_units}  # no config rewritten

    forced = systemd.install(units, shoal_exe=shoal_exe, config_dir=etc, overwrite_configs=True, check_exe=False)
    assert config in forced and config.read_text() == (CONFIGS / "tracker.toml").read_text()


def test_next_steps_enables_the_target_and_the_daemons() -> None:
    assert systemd.next_steps(["tracker"]) == (
        "systemctl daemon-reload && systemctl enable --now shoal.target shoal-tracker.service"
    )


def test_metrics_ports_are_reserved_once() -> None:
    assert len(set(systemd.METRICS_PORTS.values())) == len(systemd.METRICS_PORTS)
    for name in systemd.DAEMONS:
        schema = CLI_DAEMONS[name].load_schema()
        assert schema().daemon.metrics_listen.port == systemd.METRICS_PORTS[name]


#: Ports the tools Shoal runs beside own by default: Prometheus, Pushgateway, Alertmanager
#: (web and cluster), node_exporter, Grafana, Netdata. Debian's alertmanager failed to start
#: beside a fedserver that once used 9093/9094.
NEIGHBOURS = {9090: "Prometheus", 9091: "Pushgateway", 9093: "Alertmanager", 9094: "Alertmanager cluster",
              9100: "node_exporter", 3000: "Grafana", 19999: "Netdata"}


def test_default_ports_are_clear_of_the_monitoring_stack() -> None:
    clash = {key: NEIGHBOURS[p] for key, p in systemd_registry.PORTS.items() if p in NEIGHBOURS}
    assert clash == {}, clash


# -- default configs -------------------------------------------------------------


def documented_keys(text: str) -> dict[tuple[str, str], bool]:
    """(section, key) -> whether the line above the key is a comment."""
    found: dict[tuple[str, str], bool] = {}
    section = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"^\[([A-Za-z0-9_.-]+)\]\s*$", line):
            section = m.group(1)
        elif m := re.match(r"^([A-Za-z0-9_-]+)\s*=", line):
            found[(section, m.group(1))] = i > 0 and lines[i - 1].lstrip().startswith("#")
    return found


@pytest.mark.parametrize("name", sorted(systemd.DAEMONS))
def test_default_config_loads_as_the_schema_defaults(name: str) -> None:
    schema = CLI_DAEMONS[name].load_schema()
    path = CONFIGS / systemd.DAEMONS[name].config_file
    assert load_config(path, schema) == schema()
    assert systemd.default_config(name) == path.read_text()


@pytest.mark.parametrize("name", sorted(systemd.DAEMONS))
def test_default_config_documents_every_key(name: str) -> None:
    schema = CLI_DAEMONS[name].load_schema()
    keys = documented_keys((CONFIGS / systemd.DAEMONS[name].config_file).read_text())
    missing, undocumented = [], []
    for section in dataclasses.fields(schema):
        for field in dataclasses.fields(getattr(schema(), section.name)):
            key = (section.name, field.name)
            if key not in keys:
                missing.append(".".join(key))
            elif not keys[key]:
                undocumented.append(".".join(key))
    assert not missing, f"keys absent from the default config: {missing}"
    assert not undocumented, f"keys without a comment line above them: {undocumented}"


def test_tracker_config_is_the_tracker_schema() -> None:
    cfg = load_config(CONFIGS / "tracker.toml", TrackerConfig)
    assert cfg == TrackerConfig()
    assert str(cfg.tracker.http_listen) == str(cfg.tracker.udp_listen) == "127.0.0.1:6969"
    assert str(cfg.daemon.metrics_listen) == "127.0.0.1:9741"


def test_peer_config_is_the_peer_schema() -> None:
    cfg = load_config(CONFIGS / "peer.toml", PeerConfig)
    assert cfg == PeerConfig()
    assert str(cfg.peer.listen) == "127.0.0.1:6881"
    assert str(cfg.daemon.metrics_listen) == f"127.0.0.1:{systemd.METRICS_PORTS['peer']}"
    # Empty means "under the state directory", where the unit's sandbox lets it write.
    assert cfg.peer.download_dir == cfg.peer.control_socket == cfg.daemon.state_directory == ""


def test_peer_unit_allows_many_connections() -> None:
    s = unit_settings(systemd.render_units(systemd.DEFAULT_EXE)["shoal-peer.service"])
    peer = PeerConfig().peer
    # Every connection of every torrent at the default limits, twice over for
    # their open files, the listeners and the rest.
    assert int(s["LimitNOFILE"][0]) >= 2 * peer.max_connections_hard * peer.max_torrents


# -- Prometheus ------------------------------------------------------------------


def test_promtool_check_config() -> None:
    proc = run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = run([tool("promtool"), "check", "rules", "alerts.yml"], cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    proc = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_alerts_have_for_severity_and_annotations() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ShoalDaemonDown",
        "ShoalConfigReloadFailed",
        "ShoalTrackerHighRejectionRate",
        "ShoalTrackerSlowRequests",
        "ShoalPeerHashFailures",
        "ShoalPeerBansSpiking",
        "ShoalPeerAnnouncesFailing",
    }
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_every_alert_has_a_runbook_entry() -> None:
    """docs/operations.md says what to do when each alert fires."""
    runbook = (ROOT / "docs" / "operations.md").read_text()
    for rule in alert_rules():
        heading = f"### {rule['alert']} ({rule['labels']['severity']})"
        assert heading in runbook, f"docs/operations.md lacks {heading!r}"


def test_scrape_config_covers_the_daemons_on_their_ports() -> None:
    doc = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    for name in systemd.DAEMONS:
        targets = [t for sc in jobs[f"shoal-{name}"]["static_configs"] for t in sc["targets"]]
        assert targets and all(t.endswith(f":{systemd.METRICS_PORTS[name]}") for t in targets)


# -- metric names in alerts and dashboards ----------------------------------------


def _tracker_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = TrackerMetrics(registry, lambda: (0, 0, 0))
    rt = runtime_metrics(registry, "tracker")
    # Children of labelled metrics appear at first use; create one of each.
    metrics.reject("http", "rate_limited")
    metrics.expired.inc(0)
    rt.rpc_errors.labels(reason="bad_frame")
    rt.state_saves.labels(what="swarm", result="ok")  # StateSaver creates both results
    return registry


def _peer_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = PeerMetrics(registry, lambda: {})
    rt = runtime_metrics(registry, "peer")
    metrics.protocol_errors.labels("bad_message")
    metrics.announces.labels("ok")
    metrics.request_latency.observe(0.01)
    rt.rpc_errors.labels(reason="bad_frame")
    rt.state_saves.labels(what="swarm", result="ok")  # StateSaver creates both results
    return registry


#: Daemon -> its metrics registry, as the daemon builds it (own + runtime metrics).
def _dispatcher_registry() -> CollectorRegistry:
    from shoal.core.dispatch.machine import Core
    from shoal.daemons.dispatcher.metrics import DispatcherMetrics
    from shoal.daemons.dispatcher.store import Store

    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    metrics.watch(registry, Core(Store(Path(":memory:")), lambda name: None))
    rt = runtime_metrics(registry, "dispatcher")
    rt.rpc_errors.labels(reason="bad_frame")
    rt.state_saves.labels(what="swarm", result="ok")  # StateSaver creates both results
    return registry


def _worker_registry() -> CollectorRegistry:
    from shoal.daemons.worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry, lambda: (0, 0, 0, 0))
    runtime_metrics(registry, "worker")
    return registry


REGISTRIES = {"tracker": _tracker_registry, "peer": _peer_registry}
REGISTRIES.update(dispatcher=_dispatcher_registry, worker=_worker_registry)


def _telemetry_registry() -> CollectorRegistry:
    from shoal.daemons.telemetry.metrics import TelemetryMetrics

    registry = CollectorRegistry()
    TelemetryMetrics(registry)
    runtime_metrics(registry, "telemetry").rpc_errors.labels(reason="bad_frame")
    return registry


def _fedserver_registry() -> CollectorRegistry:
    from shoal.daemons.fedserver.metrics import FedserverMetrics

    registry = CollectorRegistry()
    FedserverMetrics(registry).run_seconds.observe(1.0)
    runtime_metrics(registry, "fedserver").rpc_errors.labels(reason="bad_frame")
    return registry


REGISTRIES.update(telemetry=_telemetry_registry, fedserver=_fedserver_registry)


def _checkpoint_registry() -> CollectorRegistry:
    from shoal.daemons.checkpoint.metrics import CheckpointMetrics

    registry = CollectorRegistry()
    metrics = CheckpointMetrics(registry, lambda: {})
    metrics.overhead.observe(0.01)
    metrics.latency.observe(0.01)
    metrics.recovery.observe(0.1)
    runtime_metrics(registry, "checkpoint").rpc_errors.labels(reason="bad_frame")
    return registry


REGISTRIES.update(checkpoint=_checkpoint_registry)


def known_metrics(daemon: str | None = None) -> dict[str, set[str]]:
    """Every series name ``daemon`` (default: any daemon) exports -> its label names."""
    names: dict[str, set[str]] = {"up": set()}
    for name, make in REGISTRIES.items():
        if daemon in (None, name):
            names.update(_series_names(make()))
    return names


def _series_names(registry: CollectorRegistry) -> dict[str, set[str]]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


_NAME_REGEX = re.compile(r'__name__\s*=~\s*"((?:[^"\\]|\\.)*)"\s*,?')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
# Labels Prometheus adds to every series (and the one prometheus.yml adds).
TARGET_LABELS = {"job", "instance", "daemon"}


def check_expr(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Problems with the metric and label names that ``expr`` uses."""
    problems, used = [], []
    for pattern in _NAME_REGEX.findall(expr):
        matched = [n for n in known if re.fullmatch(pattern, n)]
        if not matched:
            problems.append(f"__name__=~{pattern!r} matches no known metric")
        used += matched
    bare = _STRING.sub('""', _NAME_REGEX.sub("", expr))
    for name in re.findall(r"\b(shoal_[A-Za-z0-9_:]*|up)\b(?!\s*\()", bare):
        if name in known:
            used.append(name)
        else:
            problems.append(f"unknown metric {name}")
    allowed = TARGET_LABELS.union(*(known[n] for n in used)) if used else TARGET_LABELS
    labels = [label for group in _GROUPING.findall(bare) for label in re.findall(r"\w+", group)]
    labels += [label for sel in _SELECTOR.findall(bare) for label in _MATCHER_LABEL.findall(sel)]
    problems += [f"label {label!r} is on none of {used}" for label in labels if label not in allowed]
    if not used:
        problems.append("uses no metric")
    return problems


def test_metric_check_catches_typos() -> None:
    known = known_metrics()
    assert check_expr('rate(shoal_tracker_announces_total{protocol="http"}[5m])', known) == []
    assert check_expr("rate(shoal_tracker_announce_total[5m])", known)
    assert check_expr("sum by (reasons) (rate(shoal_tracker_rejected_total[5m]))", known)
    assert check_expr('{__name__=~"shoal_[a-z]+_reloads_total"}', known)
    assert check_expr('rate(shoal_peer_bytes_total{direction="up"}[5m])', known) == []
    assert check_expr("shoal_peer_peers_choking_us", known)
    assert check_expr('rate(shoal_peer_pieces_total{reason="failed"}[5m])', known)
    # Each daemon's dashboard is checked against its own metrics only.
    assert check_expr("shoal_tracker_swarms", known_metrics("peer"))


def test_every_daemon_has_its_metrics_registry() -> None:
    assert set(REGISTRIES) == set(systemd.DAEMONS)
    for name in systemd.DAEMONS:
        assert f"shoal_{name}_build_info" in known_metrics(name)


def test_alert_exprs_use_existing_metrics() -> None:
    known = known_metrics()
    problems = {r["alert"]: check_expr(r["expr"], known) for r in alert_rules()}
    assert not any(problems.values()), problems


def dashboard(name: str) -> dict:
    return json.loads((GRAFANA / f"{name}.json").read_text())


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["query"]["query"]))
    return exprs


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")


@pytest.mark.parametrize("name", sorted(systemd.DAEMONS))
def test_dashboard_exprs_use_existing_metrics(name: str) -> None:
    known = known_metrics(name)
    problems = {e: check_expr(grafana_to_promql(e), known) for e in dashboard_exprs(dashboard(name))}
    assert not any(problems.values()), {e: p for e, p in problems.items() if p}


@pytest.mark.parametrize("name", sorted(systemd.DAEMONS))
def test_dashboard_exprs_are_valid_promql(tmp_path: Path, name: str) -> None:
    rules = [
        {"record": f"shoal:dashboard_check_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(dashboard_exprs(dashboard(name)))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: Metrics each daemon's dashboard must show.
DASHBOARD_METRICS = {
    "tracker": (
        "shoal_tracker_announces_total",
        "shoal_tracker_scrapes_total",
        "shoal_tracker_rejected_total",
        "shoal_tracker_request_duration_seconds_bucket",
        "shoal_tracker_swarms",
        "shoal_tracker_seeders",
        "shoal_tracker_leechers",
        "shoal_tracker_peers_expired_total",
        "shoal_tracker_config_reloads_total",
    ),
    "peer": (
        "shoal_peer_bytes_total",
        "shoal_peer_pieces_total",
        "shoal_peer_choke_rounds_total",
        "shoal_peer_bans_total",
        "shoal_peer_protocol_errors_total",
        "shoal_peer_request_duration_seconds_bucket",
        "shoal_peer_announces_total",
        "shoal_peer_torrents",
        "shoal_peer_peers",
        "shoal_peer_peers_unchoked",
        "shoal_peer_peers_interested",
        "shoal_peer_peers_unchoking_this_peer",
        "shoal_peer_config_reloads_total",
    ),
}
DASHBOARD_METRICS.update(
    dispatcher=(
        "shoal_dispatcher_tasks_submitted_total",
        "shoal_dispatcher_tasks_started_total",
        "shoal_dispatcher_tasks_finished_total",
        "shoal_dispatcher_tasks_failed_total",
        "shoal_dispatcher_queue_depth",
        "shoal_dispatcher_response_time_seconds_bucket",
        "shoal_dispatcher_deadline_misses_total",
        "shoal_dispatcher_dispatch_decision_seconds_bucket",
        "shoal_dispatcher_specs_rejected_total",
        "shoal_dispatcher_workers",
    ),
    worker=(
        "shoal_worker_running_tasks",
        "shoal_worker_slots",
        "shoal_worker_tasks_finished_total",
        "shoal_worker_task_duration_seconds_bucket",
    ),
)
DASHBOARD_METRICS.update(
    telemetry=(
        "shoal_telemetry_window_score",
        "shoal_telemetry_threshold",
        "shoal_telemetry_window_anomalous",
        "shoal_telemetry_windows_total",
        "shoal_telemetry_model_installs_total",
        "shoal_telemetry_source_errors_total",
        "shoal_telemetry_sample_duration_seconds_bucket",
    ),
    fedserver=(
        "shoal_fedserver_runs_total",
        "shoal_fedserver_run_duration_seconds_bucket",
        "shoal_fedserver_last_success_timestamp_seconds",
        "shoal_fedserver_catch_ups_total",
    ),
)
DASHBOARD_METRICS.update(
    checkpoint=(
        "shoal_checkpoint_overhead_seconds_bucket",
        "shoal_checkpoint_latency_seconds_bucket",
        "shoal_checkpoint_recovery_seconds_bucket",
        "shoal_checkpoint_checkpoints_total",
        "shoal_checkpoint_grants_total",
        "shoal_checkpoint_rank_failures_total",
        "shoal_checkpoint_recoveries_total",
        "shoal_checkpoint_refused_total",
        "shoal_checkpoint_parity_bytes",
        "shoal_checkpoint_msglog_bytes",
        "shoal_checkpoint_optimal_interval_seconds",
        "shoal_checkpoint_overhead_ratio",
        "shoal_checkpoint_backup_in_sync",
    ),
)


@pytest.mark.parametrize("name", sorted(systemd.DAEMONS))
def test_dashboard_structure(name: str) -> None:
    dash = dashboard(name)
    assert dash["uid"] == f"shoal-{name}" and 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                assert f'job="shoal-{name}"' in target["expr"] and "$instance" in target["expr"]
    text = " ".join(dashboard_exprs(dash))
    for metric in DASHBOARD_METRICS[name]:
        assert re.search(rf"\b{metric}\b", text), f"no panel shows {metric}"
