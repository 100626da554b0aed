"""Render a lab scenario into a bundle: per host, the daemon configs, secrets and units.

Theory of operation
-------------------
One scenario becomes one directory, the same for a real LAN and for the
emulated lab (which runs exactly these files)::

    OUT/hosts/<host>/etc/shoal/<daemon>.toml   the host's configs
    OUT/hosts/<host>/etc/shoal/tokens/         shared RPC tokens (0600)
    OUT/hosts/<host>/etc/shoal/tls/            the fedserver's CA (and, on its host, its certificate and key)
    OUT/hosts/<host>/etc/shoal/keys/           SuperNode keys (telemetry hosts), authorized_keys (fedserver)
    OUT/hosts/<host>/systemd/                  the units of the host's daemons and shoal.target
    OUT/monitor/prometheus.yml, alerts.yml     one scrape job per daemon, every host a target
    OUT/manifest.json                          hosts, addresses, daemons, listeners
    OUT/README                                 how to install it

The configs are wired together here, daemon by daemon in start order
(:data:`START_ORDER`), so that a daemon that points at another one (a worker
at its dispatcher, a coordinator at its backup, a telemetry daemon at the
fedserver) reads that one's final address, overrides included:

* every listener binds the host's lab address at the registry's default port
  (:data:`~shoal.daemons.runtime.registry.PORTS`), ``[daemon] metrics_listen``
  too; state directories and unix sockets keep their defaults (each daemon's
  sockets are under its own state or runtime directory, so none collide);
* shared secrets are generated once per render and installed, byte for byte
  the same, on every host that needs them: the checkpoint token and the
  dispatcher token on every host (application ranks and ``shoal submit`` may
  run anywhere), the fedserver's RPC token on its host and the telemetry
  hosts; a CA and a certificate for the fedserver's address (and 127.0.0.1,
  where its proxy dials the SuperLink); one SuperNode key per telemetry host,
  whose public half goes into the fedserver's ``authorized_keys``;
* then the host's ``[host.config.<daemon>]`` overrides are merged over the
  result (tables deeply, other values replaced), and the file must load with
  the daemon's schema and pass its check, or :func:`render` raises a
  one-line :class:`ConfigError`.

``config_root`` is where the configs live on the target: every path written
into a config is under it. The emulated lab passes the bundle's own
``hosts/{host}/etc/shoal`` (``{host}`` is replaced per host), so its daemons
read the rendered files where they are. The two renderings differ in those
paths and in one setting (:func:`emulated_hook`, ``render(..., emulated=True)``):
the emulated hosts share one kernel, so their telemetry also reads the host's
own cgroup (``[collector] cgroup = "self"``), the one thing that tells one
host's workload from another's there. Validation always reads the bundle's
own copies of the files.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.daemons.runtime.config import ConfigError, ListenAddr, load_config, parse_config
from shoal.daemons.runtime.registry import DAEMONS, METRICS_PORTS, PORTS
from shoal.daemons.runtime.systemd import TARGET, _packaged, render_units
from shoal.lab.scenario import Host, Scenario

__all__ = ["Bundle", "DaemonPlan", "emulated_hook", "render", "START_ORDER", "toml_dumps"]

#: Daemons in the order they start (and are rendered): those others point at
#: come first. The checkpoint backup precedes its coordinator.
START_ORDER = ("tracker", "checkpoint-backup", "checkpoint", "dispatcher", "fedserver", "peer", "telemetry",
               "worker")

#: Shared token files: name -> file under the config root.
TOKENS = {"checkpoint": "tokens/checkpoint.token", "dispatcher": "tokens/dispatcher.token",
          "fedserver": "tokens/fedserver.token"}
TOKEN_BYTES = 32  # random bytes per token, written base64 (44 characters; read_token wants >= 16)
CA_FILE, CERT_FILE, KEY_FILE = "tls/ca.pem", "tls/server.pem", "tls/server.key"
NODE_KEY, NODE_PUB, AUTHORIZED_KEYS = "keys/supernode", "keys/supernode.pub", "keys/authorized_keys"
CERT_DAYS = 825.0  # the fedserver certificate's (and CA's) validity
PEER_PORT = 6881  # the peer's listen default (configs/peer.toml); the registry reserves no wire port for it
PROMETHEUS_FILE = "prometheus.yml"


@dataclass(frozen=True)
class DaemonPlan:
    host: str
    daemon: str
    config: Path  # the rendered TOML file, in the bundle
    metrics: str  # "addr:port" of its /metrics; "" when an override disabled it
    #: listener -> "addr:port", keyed like the registry's ports: tracker http, udp; checkpoint rpc
    #: (coordinator) or backup (backup); dispatcher rpc; fedserver fleet, rpc; peer "peer" (BitTorrent)
    ports: dict[str, str]


@dataclass(frozen=True)
class Bundle:
    root: Path
    #: host -> its daemons, in start order (:data:`START_ORDER`)
    plans: dict[str, list[DaemonPlan]]
    prometheus: Path  # the generated prometheus.yml
    rules: list[Path]  # the shipped alert rules, copied next to it and named by it

    def plan(self, host: str, daemon: str) -> DaemonPlan:
        for p in self.plans[host]:
            if p.daemon == daemon:
                return p
        raise KeyError(f"{host} runs no {daemon}")

    def token(self, name: str, host: str) -> Path:
        """The shared token file ``name`` (checkpoint, dispatcher, fedserver) as installed on ``host``."""
        if host not in self.plans:
            raise KeyError(f"no host {host!r}")
        path = self.root / "hosts" / host / "etc" / "shoal" / TOKENS[name]
        if not path.is_file():
            raise KeyError(f"host {host!r} has no {name} token")
        return path

    def start_order(self) -> list[DaemonPlan]:
        """Every daemon of every host in an order that works: by :data:`START_ORDER`, then by host."""
        hosts = list(self.plans)
        every = [p for ps in self.plans.values() for p in ps]
        return sorted(every, key=lambda p: (_rank(p.daemon, p.ports), hosts.index(p.host)))


def _rank(daemon: str, ports: Mapping[str, str]) -> int:
    return START_ORDER.index("checkpoint-backup" if daemon == "checkpoint" and "backup" in ports else daemon)


# --- TOML -------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str | Path):
        return _toml_str(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def toml_dumps(doc: Mapping[str, Any], header: str = "") -> str:
    """``doc`` (str, int, float, bool, Path, lists of them, tables of all these) as TOML text.

    ``header`` lines become ``#`` comments at the top.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")

    def table(path: list[str], t: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in t.items() if not isinstance(v, Mapping)]
        subs = [(k, v) for k, v in t.items() if isinstance(v, Mapping)]
        if path and (scalars or not subs):
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
        if path and (scalars or not subs):
            lines.append("")
        for k, v in subs:
            table([*path, k], v)

    table([], doc)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` deeply merged onto a copy of ``base``: tables merge, other values replace."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        elif isinstance(v, Mapping):
            out[k] = _merge({}, v)
        else:
            out[k] = v
    return out


# --- Rendering --------------------------------------------------------------


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.chmod(mode if mode & 0o077 == 0 else 0o600)  # a secret is never readable by others, even briefly
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    path.chmod(mode)


def _prepare(out: Path) -> None:
    """Make ``out`` an empty bundle directory; a previous bundle there is replaced, nothing else is."""
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise ConfigError(str(out), "-", "not empty and not a rendered bundle (no manifest.json): "
                              "refusing to write into it")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)


def _clear(out: Path) -> None:
    """Remove what a render writes into ``out`` (secrets included)."""
    for name in ("hosts", "monitor"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("manifest.json", "README"):
        (out / name).unlink(missing_ok=True)


def _one(scenario: Scenario, daemon: str, at_most: int) -> list[Host]:
    hosts = scenario.running(daemon)
    if len(hosts) > at_most:
        names = ", ".join(h.name for h in hosts)
        what = "a coordinator and its backup" if daemon == "checkpoint" else f"one {daemon}"
        raise ConfigError(scenario.source, "host", f"{len(hosts)} hosts run {daemon} ({names}); "
                          f"a lab renders {what}")
    return hosts


def _duration(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _rules() -> list[tuple[str, str]]:
    """The shipped alert rule files: (name, text); prometheus.yml and the promtool tests are not rules."""
    folder = _packaged("shoal.configs", "configs") / "prometheus"
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yml") and entry.name != PROMETHEUS_FILE and not entry.name.endswith("_test.yml"):
            found.append((entry.name, entry.read_text(encoding="utf-8")))
    return found


def _prometheus_yml(scenario: Scenario, plans: dict[str, list[DaemonPlan]], interval: float,
                    rules: list[str]) -> str:
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    lines = [
        f"# Prometheus for the lab scenario {scenario.source}: every daemon on every host.",
        "# Generated by `shoal lab render`; alerts.yml is the shipped rule file (jobs are",
        "# shoal-<daemon>, as in configs/prometheus/prometheus.yml). Check it with",
        "#   promtool check config prometheus.yml",
        "",
        "global:",
        f"  scrape_interval: {_duration(interval)}",
        f"  evaluation_interval: {_duration(interval)}",
        f"  scrape_timeout: {_duration(min(interval, 10.0))}",
        "",
        "rule_files:",
        *[f"  - {q(r)}" for r in rules],
        "",
        "scrape_configs:",
    ]
    for daemon in DAEMONS:
        targets = [(h, p.metrics) for h, ps in plans.items() for p in ps if p.daemon == daemon and p.metrics]
        if not targets:
            continue
        lines += [f"  - job_name: {q('shoal-' + daemon)}", "    static_configs:"]
        for host, target in targets:
            lines += [f"      - targets: [{q(target)}]",
                      f"        labels: {{host: {q(host)}, daemon: {q(daemon)}}}"]
    if not any(line.startswith("  - job_name") for line in lines):
        lines[-1] = "scrape_configs: []"
    return "\n".join(lines) + "\n"


class _Renderer:
    def __init__(self, scenario: Scenario, out: Path, config_root: str, exe: str, emulated: bool = False) -> None:
        self.s = scenario
        self.emulated = emulated
        self.out = out
        self.config_root = config_root
        self.exe = exe
        self.checkpoint = _one(scenario, "checkpoint", 2)
        self.dispatcher = _one(scenario, "dispatcher", 1)
        self.fedserver = _one(scenario, "fedserver", 1)
        self.telemetry = scenario.running("telemetry")
        if scenario.running("worker") and not self.dispatcher:
            raise ConfigError(scenario.source, "host", "workers need a host that runs the dispatcher")
        #: (host, daemon) -> the validated config object, for those that point at it
        self.configs: dict[tuple[str, str], Any] = {}

    def target_root(self, host: Host) -> str:
        return self.config_root.replace("{host}", host.name).rstrip("/") or "/"

    def local_dir(self, host: Host) -> Path:
        return self.out / "hosts" / host.name / "etc" / "shoal"

    # -- secrets --

    def secrets(self) -> None:
        hosts = self.s.hosts
        shared: dict[str, list[Host]] = {}
        if self.checkpoint:
            shared["checkpoint"] = list(hosts)  # and every host that runs application ranks: all of them
        if self.dispatcher:
            shared["dispatcher"] = list(hosts)  # workers, and `shoal submit` from anywhere
        if self.fedserver:
            shared["fedserver"] = [*self.fedserver, *(h for h in self.telemetry if h not in self.fedserver)]
        for name, on in shared.items():
            token = base64.b64encode(secrets.token_bytes(TOKEN_BYTES)) + b"\n"
            for h in on:
                _write(self.local_dir(h) / TOKENS[name], token, 0o600)
        if not self.fedserver:
            return
        from shoal.daemons.fedserver.certs import make_node_key, make_tls

        fed = self.fedserver[0]
        fed_dir = self.local_dir(fed)
        tls = make_tls(fed_dir / "tls", [self.s.address(fed), "127.0.0.1"], days=CERT_DAYS,
                       ca_name=f"Shoal lab CA ({Path(self.s.source).stem})")
        assert tls["ca"] == fed_dir / CA_FILE and tls["cert"] == fed_dir / CERT_FILE
        ca = tls["ca"].read_bytes()
        keys = ["# SuperNode public keys of the telemetry hosts (shoal lab render), one a line"]
        for h in self.telemetry:
            d = self.local_dir(h)
            if h.name != fed.name:
                _write(d / CA_FILE, ca)
            private, public = make_node_key(d / "keys", f"{h.name}-node")
            private.replace(d / NODE_KEY)
            public.replace(d / NODE_PUB)
            keys.append((d / NODE_PUB).read_text().strip())
        _write(fed_dir / AUTHORIZED_KEYS, "\n".join(keys) + "\n")

    # -- configs --

    def tables(self, host: Host, daemon: str, root: str) -> dict[str, Any]:
        """The wired config of ``daemon`` on ``host`` (before overrides), paths under ``root``."""
        addr = self.s.address(host)
        spec = DAEMONS[daemon]
        t: dict[str, Any] = {"daemon": {"metrics_listen": f"{addr}:{METRICS_PORTS[daemon]}"}}
        if daemon == "tracker":
            exempt = list(spec.load_schema()().access.rate_limit_exempt)
            if str(self.s.subnet) not in exempt:
                exempt.append(str(self.s.subnet))
            t["tracker"] = {"http_listen": f"{addr}:{PORTS['tracker', 'http']}",
                            "udp_listen": f"{addr}:{PORTS['tracker', 'udp']}"}
            t["access"] = {"rate_limit_exempt": exempt}
        elif daemon == "peer":
            t["peer"] = {"listen": f"{addr}:{PEER_PORT}"}
        elif daemon == "checkpoint":
            c: dict[str, Any] = {"token_file": f"{root}/{TOKENS['checkpoint']}"}
            if host is self.checkpoint[0]:
                c |= {"role": "coordinator", "listen": f"{addr}:{PORTS['checkpoint', 'rpc']}"}
                if len(self.checkpoint) > 1:
                    backup = self.configs[self.checkpoint[1].name, "checkpoint"]
                    c["backup"] = str(backup.checkpoint.listen)
            else:
                c |= {"role": "backup", "listen": f"{addr}:{PORTS['checkpoint', 'backup']}"}
            t["checkpoint"] = c
        elif daemon == "dispatcher":
            t["dispatcher"] = {"rpc_listen": f"{addr}:{PORTS['dispatcher', 'rpc']}",
                               "token_file": f"{root}/{TOKENS['dispatcher']}"}
        elif daemon == "worker":
            dispatcher = self.configs[self.dispatcher[0].name, "dispatcher"]
            w: dict[str, Any] = {"dispatcher": str(dispatcher.dispatcher.rpc_listen),
                                 "token_file": f"{root}/{TOKENS['dispatcher']}",
                                 "id": host.name}  # the default, the host name, is one name on one machine
            telemetry = self.configs.get((host.name, "telemetry"))
            if telemetry is not None and telemetry.daemon.metrics_listen is not None:
                w["telemetry_metrics"] = f"http://{telemetry.daemon.metrics_listen}/metrics"
            t["worker"] = w
        elif daemon == "fedserver":
            t["superlink"] = {"listen": f"{addr}:{PORTS['fedserver', 'fleet']}",
                              "ssl_certfile": f"{root}/{CERT_FILE}", "ssl_keyfile": f"{root}/{KEY_FILE}",
                              "ssl_ca_certfile": f"{root}/{CA_FILE}", "supernode_auth": True,
                              "authorized_keys": f"{root}/{AUTHORIZED_KEYS}"}
            t["rpc"] = {"listen": f"{addr}:{PORTS['fedserver', 'rpc']}",
                        "token_file": f"{root}/{TOKENS['fedserver']}"}
            default_min = spec.load_schema()().federation.min_nodes
            if 0 < len(self.telemetry) < default_min:  # else a run would wait for nodes that do not exist
                t["federation"] = {"min_nodes": len(self.telemetry)}
        elif daemon == "telemetry" and self.fedserver:
            fed = self.configs[self.fedserver[0].name, "fedserver"]
            t["federation"] = {"enabled": True, "superlink": str(fed.superlink.listen),
                               "root_certificates": f"{root}/{CA_FILE}", "auth_private_key": f"{root}/{NODE_KEY}",
                               "fedserver": str(fed.rpc.listen), "token_file": f"{root}/{TOKENS['fedserver']}"}
        t = _merge(_merge(t, swarm_hook(host, daemon, root)), emulated_hook(daemon, self.emulated))
        return _merge(t, host.config.get(daemon, {}))

    def render_one(self, host: Host, daemon: str) -> DaemonPlan:
        spec = DAEMONS[daemon]
        path = self.local_dir(host) / spec.config_file
        header = (f"{spec.unit} on lab host {host.name} ({self.s.address(host)}), rendered by "
                  f"`shoal lab render` from {self.s.source}.\nEvery key is documented in configs/{spec.config_file}.")
        target = self.tables(host, daemon, self.target_root(host))
        _write(path, toml_dumps(target, header))
        _make_socket_dir(self.out, target)
        local_root = str(self.local_dir(host).resolve())
        try:
            if local_root == self.target_root(host):
                config = load_config(path, spec.load_schema())
            else:  # the same text with the bundle's own paths, so the files it names are read
                local = toml_dumps(self.tables(host, daemon, local_root), header)
                config = parse_config(local, spec.load_schema(), source=str(path))
            spec.run_check(config)
        except ConfigError as exc:
            where = path.relative_to(self.out)
            raise ConfigError(self.s.source, f"host {host.name}: config.{daemon}.{exc.key}",
                              f"{exc.reason} (rendered {where})") from None
        self.configs[host.name, daemon] = config
        return DaemonPlan(host.name, daemon, path, _metrics(config), _ports(daemon, config))

    def units(self, host: Host) -> None:
        units = render_units(self.exe, config_dir=self.target_root(host))
        folder = self.out / "hosts" / host.name / "systemd"
        for d in host.daemons:
            _write(folder / DAEMONS[d].unit, units[DAEMONS[d].unit])
        _write(folder / TARGET, units[TARGET])


# --- swarm inputs: a worker fetches `swarm:` task inputs through its host's peer --------

#: The peer's control socket on a host that also runs a worker, under the host's file
#: system root: where the peer puts it by default under systemd (its StateDirectory=).
PEER_CONTROL_SOCKET = "var/lib/shoal-peer/control.sock"
ETC_SHOAL = "/etc/shoal"  # a config root ending so is <the host's file system root>/etc/shoal


def swarm_hook(host: Host, daemon: str, root: str) -> dict[str, Any]:
    """On a host running both a peer and a worker, point the worker's swarm hook at that peer.

    Both get the one control socket path: the peer's own ``control_socket``
    override if the scenario sets one, else :data:`PEER_CONTROL_SOCKET` under
    the host's root (``/`` on a real machine, where it is the peer's default;
    the bundle's ``hosts/<host>/`` for the emulated lab, whose peers would
    otherwise each put theirs in a state directory the render does not know).
    Other hosts get nothing (``swarm:`` inputs then fail with a one-line reason).
    """
    if not {"peer", "worker"} <= set(host.daemons):
        return {}
    socket = host.config.get("peer", {}).get("peer", {}).get("control_socket", "")
    if not socket:
        base = root[: -len(ETC_SHOAL)] if root.endswith(ETC_SHOAL) else ""
        socket = f"{base}/{PEER_CONTROL_SOCKET}"
    if daemon == "peer":
        return {"peer": {"control_socket": socket}}
    if daemon == "worker":
        return {"worker": {"peer_socket": socket}}
    return {}


def emulated_hook(daemon: str, emulated: bool) -> dict[str, Any]:
    """What only an emulated lab's hosts get: their telemetry reads the host's own cgroup.

    The emulated hosts share one kernel, whose /proc/stat, /proc/meminfo and
    /proc/diskstats are the same from every host; the lab makes each host a
    cgroup (lab/cgroups.py), and ``[collector] cgroup = "self"`` makes that
    host's CPU, memory and IO features of its windows. A real machine's /proc is
    its own, so a LAN bundle leaves the key at its default (off). A scenario's
    own ``[host.config.telemetry.collector]`` overrides this.
    """
    if emulated and daemon == "telemetry":
        return {"collector": {"cgroup": "self"}}
    return {}


def _make_socket_dir(out: Path, tables: Mapping[str, Any]) -> None:
    """The directory of a peer's control socket, when it lies in the bundle (the emulated lab's case)."""
    socket = tables.get("peer", {}).get("control_socket", "")
    if socket and Path(socket).is_relative_to(out):
        Path(socket).parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _metrics(config: Any) -> str:
    m = config.daemon.metrics_listen
    return "" if m is None else str(m)


def _ports(daemon: str, config: Any) -> dict[str, str]:
    found: dict[str, ListenAddr | None] = {}
    if daemon == "tracker":
        found = {"http": config.tracker.http_listen, "udp": config.tracker.udp_listen}
    elif daemon == "peer":
        found = {"peer": config.peer.listen}
    elif daemon == "checkpoint":
        c = config.checkpoint
        found = {"rpc" if c.role == "coordinator" else "backup": c.listen}
    elif daemon == "dispatcher":
        found = {"rpc": config.dispatcher.rpc_listen}
    elif daemon == "fedserver":
        found = {"fleet": config.superlink.listen, "rpc": config.rpc.listen}
    return {k: str(v) for k, v in found.items() if v is not None}


README = """\
Shoal deployment bundle for the lab scenario {source} (`shoal lab render`).
On each machine: copy hosts/<host>/etc/shoal/ to {config_root}/ and hosts/<host>/systemd/* to /etc/systemd/system/,
  then `systemctl daemon-reload && systemctl enable --now shoal.target` and its shoal-*.service units.
Secrets (tokens/, tls/server.key, keys/supernode) are mode 0600: install the static shoal user
  (systemd/shoal-sysusers.conf), then `chgrp shoal` and `chmod 0640` them so the daemons can read them.
Point Prometheus at monitor/prometheus.yml (alert rules beside it); manifest.json lists every host and daemon.
"""


def render(scenario: Scenario, out: Path, *, config_root: str = "/etc/shoal", exe: str = "/usr/local/bin/shoal",
           scrape_interval: float | None = None, emulated: bool = False) -> Bundle:
    """Render ``scenario`` into the bundle directory ``out`` (see the module docstring).

    ``out`` must be empty, absent, or a bundle rendered before (which is
    replaced). ``config_root`` is where the configs live on the targets
    (``{host}`` is replaced by each host's name); ``exe`` is the ``shoal``
    executable the units run. ``emulated`` (the emulated lab's own render) is the
    one difference in settings: telemetry reads the host's cgroup, because the
    emulated hosts share one kernel (:func:`emulated_hook`). Raises :class:`ConfigError` (one line) if the
    scenario cannot be wired or a rendered config does not validate.
    """
    try:  # the units name both paths, which must need no escaping
        render_units(exe, config_dir=config_root.replace("{host}", "host"))
    except ValueError as exc:
        raise ConfigError(scenario.source, "render", str(exc)) from None
    out = Path(out).absolute()
    r = _Renderer(scenario, out, config_root, exe, emulated)  # refuses what cannot be wired before writing anything
    _prepare(out)
    try:
        return _render(r, scenario, out, config_root, exe, scrape_interval)
    except BaseException:
        _clear(out)  # no half bundle, and no secrets left behind by a refused one
        raise


def _render(r: _Renderer, scenario: Scenario, out: Path, config_root: str, exe: str,
            scrape_interval: float | None) -> Bundle:
    r.secrets()
    plans: dict[str, list[DaemonPlan]] = {h.name: [] for h in scenario.hosts}
    order: list[tuple[int, int, Host, str]] = []
    for h in scenario.hosts:
        for d in h.daemons:
            backup = d == "checkpoint" and h is not r.checkpoint[0]
            order.append((START_ORDER.index("checkpoint-backup" if backup else d), h.index, h, d))
    for _, _, h, d in sorted(order, key=lambda o: (o[0], o[1])):
        plans[h.name].append(r.render_one(h, d))
    for h in scenario.hosts:
        r.units(h)

    monitor = out / "monitor"
    rules = []
    for name, text in _rules():
        _write(monitor / name, text)
        rules.append(monitor / name)
    interval = scenario.monitor.scrape_interval if scrape_interval is None else scrape_interval
    prometheus = monitor / PROMETHEUS_FILE
    _write(prometheus, _prometheus_yml(scenario, plans, interval, [p.name for p in rules]))

    def rel(p: Path) -> str:
        return str(p.relative_to(out))

    def role(p: DaemonPlan) -> dict[str, str]:
        if p.daemon != "checkpoint":
            return {}
        return {"role": "coordinator" if "rpc" in p.ports else "backup"}

    manifest = {
        "scenario": scenario.source,
        "subnet": str(scenario.subnet),
        "config_root": config_root,
        "exe": exe,
        "monitor": {"host": scenario.monitor.host, "prometheus": rel(prometheus), "rules": [rel(p) for p in rules],
                    "scrape_interval": interval},
        "hosts": [
            {"name": h.name, "address": scenario.address(h), "config_dir": rel(r.local_dir(h)),
             "units": rel(out / "hosts" / h.name / "systemd"),
             "tokens": sorted(n for n, f in TOKENS.items() if (r.local_dir(h) / f).is_file()),
             "daemons": [{"daemon": p.daemon, **role(p), "unit": DAEMONS[p.daemon].unit, "config": rel(p.config),
                          "metrics": p.metrics, "ports": p.ports} for p in plans[h.name]]}
            for h in scenario.hosts
        ],
    }
    _write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _write(out / "README", README.format(source=scenario.source, config_root=config_root))
    return Bundle(out, plans, prometheus, rules)

