"""A lab scenario: the hosts of an emulated LAN, their links, an experiment and a fault schedule.

A scenario is one TOML file, validated by the one config loader
(:mod:`shoal.daemons.runtime.config`): an unknown key is refused, and every
error is one line naming the file, the key and the reason. ``shoal lab check``
runs exactly this validation. Example (``configs/lab/*.toml`` are complete ones)::

    [lab]
    subnet = "198.18.0.0/15"      # RFC 2544's benchmarking range; never routed outside the lab

    [link]                        # every host's link unless the host says otherwise
    upload = 2.0                  # MiB/s from the host into the LAN (0: unshaped)
    download = 8.0                # MiB/s from the LAN to the host
    delay = 5.0                   # ms, one way, in each direction of the host's link

    [[host]]
    name = "seed"
    daemons = ["tracker", "peer"]
    [host.config.peer.limits]     # overrides of the daemon's own config, validated by its schema
    upload_rate = 0

    [[host]]
    name = "leech"                # count = 4 makes leech1 .. leech4
    count = 4
    daemons = ["peer"]

    [experiment]
    kind = "swarm"
    [experiment.params]           # validated by the experiment's own schema
    file_mib = 16

    [[fault]]
    at = 10.0                     # seconds after the experiment starts
    kind = "kill"                 # kill -9 the daemon; the lab restarts it, as systemd would
    host = "leech2"
    daemon = "peer"

A packet from host A to host B crosses A's link (A's upload rate, delay,
jitter and loss) and then B's (B's download rate, delay, jitter and loss): the
round trip between A and B is ``2 * (delay_A + delay_B)``, as with Mininet's
links through one switch.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shoal.daemons.runtime.config import ConfigError, build_config, read_config_text, setting
from shoal.daemons.runtime.registry import DAEMONS
from shoal.daemons.telemetry.inject import ALIASES as INJECTOR_ALIASES
from shoal.daemons.telemetry.inject import KINDS as INJECTOR_KINDS

__all__ = ["Fault", "Host", "Link", "Scenario", "load_scenario", "parse_scenario", "EXPERIMENTS"]

#: The experiment kinds and the module of each (``run(lab, params, out)``, ``Params``).
EXPERIMENTS = {
    "none": "",
    "swarm": "shoal.lab.experiments.swarm",
    "dispatch": "shoal.lab.experiments.dispatch",
    "checkpoint": "shoal.lab.experiments.checkpoint",
    "telemetry": "shoal.lab.experiments.telemetry",
}

#: Telemetry fault kinds an ``inject`` fault may name (``shoal telemetry inject``).
INJECT_KINDS = (*INJECTOR_KINDS, *INJECTOR_ALIASES)  # shoal telemetry inject's

# A host's name is part of interface and namespace names (IFNAMSIZ is 16) and
# of rendered file names: short, lower case, no separators but '-'.
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
MAX_HOSTS = 200  # the bridge's ports, one process per daemon each: the size of one machine


@dataclass(frozen=True, slots=True)
class Link:
    """One host's link into the LAN switch, shaped in both directions."""

    upload: float = setting(0.0, min=0.0, max=10_000.0, help="MiB/s from the host into the LAN; 0 is unshaped")
    download: float = setting(0.0, min=0.0, max=10_000.0, help="MiB/s from the LAN to the host; 0 is unshaped")
    delay: float = setting(0.0, min=0.0, max=5_000.0, help="ms added one way, in each direction")
    jitter: float = setting(0.0, min=0.0, max=5_000.0, help="ms: each packet's delay varies uniformly by +-jitter")
    loss: float = setting(0.0, min=0.0, max=100.0, help="percent of packets dropped, in each direction")
    queue: int = setting(1000, min=10, max=100_000, help="packets a shaper queues before it drops")

    def __post_init__(self) -> None:
        if self.jitter > self.delay:
            raise ValueError(f"jitter: {self.jitter} ms is more than the delay ({self.delay} ms)")


@dataclass(frozen=True, slots=True)
class HostTable:
    name: str = setting()
    count: int = setting(1, min=1, max=MAX_HOSTS, help="hosts made from this table: NAME1..NAMEn when above 1")
    daemons: tuple[str, ...] = setting(())
    link: Link = setting(Link())


@dataclass(frozen=True, slots=True)
class LabSection:
    subnet: str = setting("198.18.0.0/15", help="the lab's addresses; must overlap no route of this machine")
    seed: int = setting(0, min=0, help="seeds every random choice of the run (fault moments, files)")
    restart_delay: float = setting(1.0, min=0.0, max=60.0, help="s before a killed daemon restarts (RestartSec)")
    ready_timeout: float = setting(60.0, min=1.0, max=600.0, help="s for every daemon to report ready")


@dataclass(frozen=True, slots=True)
class MonitorSection:
    host: str = setting("", help="the host that runs Prometheus; empty: no monitoring")
    scrape_interval: float = setting(1.0, min=0.1, max=60.0, help="s between scrapes of every daemon")


@dataclass(frozen=True, slots=True)
class ExperimentSection:
    kind: str = setting("none", choices=tuple(EXPERIMENTS))
    timeout: float = setting(600.0, min=1.0, max=86_400.0, help="s before the experiment is stopped as failed")


@dataclass(frozen=True, slots=True)
class Fault:
    """One entry of the fault schedule, applied ``at`` seconds after the experiment starts."""

    at: float = setting(min=0.0, max=86_400.0)
    kind: Literal["kill", "host-down", "link-down", "link", "inject"] = setting()
    host: str = setting()
    daemon: str = setting("", help="kill: the daemon to kill -9")
    duration: float = setting(0.0, min=0.0, max=86_400.0, help="s; 0: for the rest of the run")
    # kind = "link": the new settings (a negative value keeps the current one)
    delay: float = setting(-1.0, min=-1.0, max=5_000.0)
    jitter: float = setting(-1.0, min=-1.0, max=5_000.0)
    loss: float = setting(-1.0, min=-1.0, max=100.0)
    upload: float = setting(-1.0, min=-1.0, max=10_000.0)
    download: float = setting(-1.0, min=-1.0, max=10_000.0)
    # kind = "inject": a telemetry fault
    inject: str = setting("cpu", choices=INJECT_KINDS)

    def __post_init__(self) -> None:
        if self.kind == "kill" and not self.daemon:
            raise ValueError("daemon: a kill fault names the daemon to kill")
        if self.kind != "kill" and self.daemon:
            raise ValueError(f"daemon: only a kill fault names a daemon, not a {self.kind} fault")
        if self.kind == "inject" and self.duration <= 0:
            raise ValueError("duration: an inject fault needs a duration above 0")
        if self.kind == "link" and all(v < 0 for v in (self.delay, self.jitter, self.loss, self.upload,
                                                         self.download)):
            raise ValueError("kind: a link fault changes at least one of delay, jitter, loss, upload, download")


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated host, after ``count`` expansion."""

    name: str
    index: int  # 0-based, in file order: the host's address and interface names follow it
    daemons: tuple[str, ...]
    link: Link
    #: the daemon config overrides, ``{daemon: {table: {key: value}}}`` (validated by the render)
    config: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Scenario:
    source: str
    subnet: ipaddress.IPv4Network
    seed: int
    restart_delay: float
    ready_timeout: float
    hosts: tuple[Host, ...]
    monitor: MonitorSection
    experiment: ExperimentSection
    #: the experiment's own parameters (validated by its ``Params`` schema)
    params: Any
    faults: tuple[Fault, ...]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def address(self, host: Host | str) -> str:
        """The host's lab address: the subnet's (index + 1)th address."""
        h = self.host(host) if isinstance(host, str) else host
        return str(self.subnet.network_address + h.index + 1)

    def running(self, daemon: str) -> list[Host]:
        return [h for h in self.hosts if daemon in h.daemons]


_TOP = {"lab", "link", "host", "monitor", "experiment", "fault"}


def load_scenario(path: str | Path) -> Scenario:
    return parse_scenario(read_config_text(path), source=str(path))


def parse_scenario(text: str, *, source: str = "<string>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"invalid TOML: {exc}") from None
    for key in doc:
        if key not in _TOP:
            raise ConfigError(source, key, "unknown key")
    lab = build_config(_table(doc, "lab", source), LabSection, source=source, prefix="lab.")
    try:
        subnet = ipaddress.IPv4Network(lab.subnet)
    except ValueError as exc:
        raise ConfigError(source, "lab.subnet", f"not an IPv4 network: {exc}") from None
    link_defaults = _table(doc, "link", source)
    build_config(link_defaults, Link, source=source, prefix="link.")

    hosts: list[Host] = []
    tables = doc.get("host", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(source, "host", "expected one or more [[host]] tables")
    for i, raw in enumerate(tables):
        prefix = f"host[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(source, f"host[{i}]", "expected a table")
        raw = dict(raw)
        overrides = raw.pop("config", {})
        raw["link"] = {**link_defaults, **_table(raw, "link", source, prefix)}
        t = build_config(raw, HostTable, source=source, prefix=prefix)
        if not _HOST_NAME.match(t.name):
            raise ConfigError(source, prefix + "name",
                              f"{t.name!r}: a host name is a lower-case letter then up to 11 of a-z, 0-9, -")
        for d in t.daemons:
            if d not in DAEMONS:
                raise ConfigError(source, prefix + "daemons",
                                  f"unknown daemon {d!r} (known: {', '.join(DAEMONS)})")
        if len(set(t.daemons)) != len(t.daemons):
            raise ConfigError(source, prefix + "daemons", "a daemon is listed twice")
        config = _overrides(overrides, t.daemons, source, prefix + "config")
        names = [t.name] if t.count == 1 else [f"{t.name}{n}" for n in range(1, t.count + 1)]
        for name in names:
            if not _HOST_NAME.match(name):
                raise ConfigError(source, prefix + "name", f"{name!r} is too long a host name")
            hosts.append(Host(name, len(hosts), t.daemons, t.link, config))
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise ConfigError(source, "host", f"two hosts are named {h.name!r}")
        seen.add(h.name)
    if len(hosts) > MAX_HOSTS:
        raise ConfigError(source, "host", f"{len(hosts)} hosts; at most {MAX_HOSTS}")
    if subnet.num_addresses < len(hosts) + 2:
        raise ConfigError(source, "lab.subnet", f"{subnet} has too few addresses for {len(hosts)} hosts")

    monitor = build_config(_table(doc, "monitor", source), MonitorSection, source=source, prefix="monitor.")
    if monitor.host and monitor.host not in seen:
        raise ConfigError(source, "monitor.host", f"no host is named {monitor.host!r}")

    exp_table = dict(_table(doc, "experiment", source))
    params_table = _table(exp_table, "params", source, "experiment.")
    exp_table.pop("params", None)
    experiment = build_config(exp_table, ExperimentSection, source=source, prefix="experiment.")
    params = _experiment_params(experiment.kind, params_table, source)

    faults = []
    fault_tables = doc.get("fault", [])
    if not isinstance(fault_tables, list):
        raise ConfigError(source, "fault", "expected [[fault]] tables")
    by_name = {h.name: h for h in hosts}
    for i, raw in enumerate(fault_tables):
        prefix = f"fault[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(source, f"fault[{i}]", "expected a table")
        f = build_config(raw, Fault, source=source, prefix=prefix)
        host = by_name.get(f.host)
        if host is None:
            raise ConfigError(source, prefix + "host", f"no host is named {f.host!r}")
        if f.kind == "kill" and f.daemon not in host.daemons:
            raise ConfigError(source, prefix + "daemon", f"host {f.host!r} runs no {f.daemon!r}")
        if f.kind == "inject" and "telemetry" not in host.daemons:
            # the injector is the telemetry daemon's own command, run on the host
            raise ConfigError(source, prefix + "host", f"host {f.host!r} runs no telemetry daemon to inject with")
        faults.append(f)
    faults.sort(key=lambda f: f.at)
    return Scenario(source, subnet, lab.seed, lab.restart_delay, lab.ready_timeout, tuple(hosts), monitor,
                    experiment, params, tuple(faults))


def _table(doc: dict[str, Any], key: str, source: str, prefix: str = "") -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(source, prefix + key, "expected a table")
    return value


def _overrides(raw: Any, daemons: tuple[str, ...], source: str, key: str) -> dict[str, dict[str, Any]]:
    """Each ``[host.config.DAEMON]`` table: for a daemon the host runs, and a table.

    Its keys and values are checked when the lab renders the host's configs
    (:func:`shoal.lab.render.render`, run by ``shoal lab check`` too): only the
    merged config can be judged, since an override of a listener, say, is valid
    only with the token the renderer adds.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected a table")
    out: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if name not in daemons:
            raise ConfigError(source, f"{key}.{name}", "the host does not run this daemon")
        if not isinstance(table, dict):
            raise ConfigError(source, f"{key}.{name}", "expected a table")
        out[name] = table
    return out


def _experiment_params(kind: str, table: dict[str, Any], source: str) -> Any:
    module = EXPERIMENTS[kind]
    if not module:
        if table:
            raise ConfigError(source, "experiment.params", "experiment kind \"none\" takes no parameters")
        return None
    import importlib

    params = importlib.import_module(module).Params
    return build_config(table, params, source=source, prefix="experiment.params.")


def replace_params(scenario: Scenario, **changes: Any) -> Scenario:
    """The scenario with some experiment parameters changed (benchmarks sweep N this way)."""
    return dataclasses.replace(scenario, params=dataclasses.replace(scenario.params, **changes))
