"""The one registry of the daemons: names, code, ports and unit settings.

Everything that enumerates the daemons reads :data:`DAEMONS`: the ``shoal``
command (``shoal <name> run``, ``shoal config check``), the systemd units
(:mod:`shoal.daemons.runtime.systemd`), each config's default ports, the
shipped Prometheus scrape config and the tests. The code of a daemon is named
by ``"module:attr"`` strings and imported only when used, so listing the
daemons costs no import of onnxruntime or Flower.

Ports
-----
Each daemon's default listening ports are reserved here, so that two daemons on
one node never collide. They are chosen clear of the ports in Prometheus's
default-port allocation list for exporters (9100-9999 is crowded: node_exporter
9100, Alertmanager 9093/9094, Pushgateway 9091, ...): Shoal's metrics ports are
9741-9747, unassigned there; its service ports follow the protocol's custom
(6969 for a BitTorrent tracker) or sit in 74xx/77xx.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DaemonSpec", "DAEMONS", "METRICS_PORTS", "PORTS"]


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """One daemon: its code, its ports and what its unit has that the template does not."""

    name: str
    description: str
    schema: str = ""  # "module:attr" of the config dataclass
    factory: str = ""  # "module:attr" of make_app(ctx)
    check: str | None = None  # validation beyond the schema (the files it names, ...)
    #: ``module:function(daemon_subparsers, top_subparsers)`` adding the daemon's
    #: own commands (``shoal peer add``, ``shoal get``, ...)
    commands: str | None = None
    #: the default port of every listener, by config key (``metrics`` is ``[daemon] metrics_listen``)
    ports: dict[str, int] = field(default_factory=dict)
    config: str = ""  # file name under the config dir; default "<name>.toml"
    #: ``(key, value, why)``: replaces every ``key=`` line of the unit template
    #: (value None removes it), or is appended to ``[Service]`` if the template
    #: has no such key. ``why`` becomes a comment in the unit.
    service: tuple[tuple[str, str | None, str], ...] = ()

    @property
    def unit(self) -> str:
        return f"shoal-{self.name}.service"

    @property
    def config_file(self) -> str:
        return self.config or f"{self.name}.toml"

    @staticmethod
    def _resolve(ref: str) -> Any:
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)

    def load_schema(self) -> Any:
        return self._resolve(self.schema)

    def load_factory(self) -> Any:
        return self._resolve(self.factory)

    def add_commands(self, dsub: Any, sub: Any) -> None:
        if self.commands:
            self._resolve(self.commands)(dsub, sub)

    def run_check(self, config: Any) -> None:
        if self.check:
            self._resolve(self.check)(config)


def _d(name: str, description: str, **kw: Any) -> DaemonSpec:
    base = f"shoal.daemons.{name}"
    kw.setdefault("schema", f"{base}.config:{kw.pop('config_class')}")
    kw.setdefault("factory", f"{base}.daemon:make_app")
    return DaemonSpec(name, description, **kw)


DAEMONS: dict[str, DaemonSpec] = {
    d.name: d
    for d in (
        _d("tracker", "Shoal BitTorrent tracker (HTTP and UDP announce/scrape)",
           config_class="TrackerConfig", check="shoal.daemons.tracker.daemon:check_config",
           ports={"metrics": 9741, "http": 6969, "udp": 6969},
           service=(("LimitNOFILE", "65536", "one descriptor per open HTTP announce connection"),)),
        _d("peer", "Shoal BitTorrent peer (downloads and seeds torrents)",
           config_class="PeerConfig", commands="shoal.daemons.peer.cli:add_commands",
           ports={"metrics": 9742},
           service=(("LimitNOFILE", "65536", "one descriptor per peer connection and per open torrent file"),)),
        _d("checkpoint",
           "Shoal checkpoint coordinator or backup (in-memory N+1 parity of application checkpoints)",
           config_class="CheckpointConfig", check="shoal.daemons.checkpoint.config:check_config",
           commands="shoal.ckpt.cli:add_commands",  # `shoal ckpt ...`: the library's launcher and status
           ports={"metrics": 9745, "rpc": 7745, "backup": 7746},
           service=(("LimitNOFILE", "65536", "three RPC connections per rank of every group"),)),
        _d("dispatcher", "Shoal dispatcher (DAG jobs of dependent tasks, pulled by workers)",
           config_class="DispatcherConfig", check="shoal.daemons.dispatcher.daemon:check_config",
           commands="shoal.daemons.dispatcher.cli:add_commands",
           ports={"metrics": 9746, "rpc": 7460},
           service=(
               ("LimitNOFILE", "65536", "one descriptor per worker and client connection"),
               ("RuntimeDirectory", "shoal-dispatcher", "holds submit.sock, the submit socket (docs/dispatch.md)"),
               ("RuntimeDirectoryMode", "0755", "every local user may reach the submit socket; its peer check decides"),
               ("PrivateUsers", "no",
                "the submit socket's peer credentials must name the real user, not the namespace's nobody"),
           )),
        _d("worker", "Shoal worker (runs the dispatcher's tasks, each in its own process)",
           config_class="WorkerConfig", check="shoal.daemons.worker.daemon:check_config",
           commands="shoal.daemons.worker.cli:add_commands",
           ports={"metrics": 9747},
           service=(
               ("MemoryDenyWriteExecute", "no",
                "tasks may be JIT runtimes (Java, Node.js, PyPy) that need writable+executable memory"),
               ("LimitNOFILE", "65536", "two pipes per running task and the dispatcher connection"),
               ("Delegate", "yes", "each task runs in its own cgroup under the worker's, with its cpus and memory"),
               ("ProtectControlGroups", "no", "the worker writes its delegated cgroup (task cgroups, limits)"),
               ("ExecStartPre", "+{exe} worker delegate-cgroups",
                "on a cgroup v1 host Delegate= hands over no controller: as root, give the worker its own "
                "memory and cpu directories (does nothing on cgroup v2)"),
               ("MemoryAccounting", "yes", "the worker has a v1 memory directory of its own to delegate"),
               ("CPUAccounting", "yes", "and a v1 cpu directory"),
               ("PrivateUsers", "no", "tasks run as task_user, which must be a real user outside a namespace"),
               ("CapabilityBoundingSet", "CAP_SETUID CAP_SETGID",
                "switch tasks to task_user (they are killed through their cgroup: cgroup.kill needs no CAP_KILL)"),
               ("AmbientCapabilities", "CAP_SETUID CAP_SETGID",
                "the same; a task drops them before exec (and gets no_new_privs)"),
               ("SystemCallFilter", "@system-service @setuid", "the worker changes a task's uid, gid and groups"),
               ("StateDirectoryMode", "0711", "the task user enters its own task directory (and lists nothing)"),
           )),
        _d("telemetry", "Shoal node telemetry (collector, ONNX anomaly detector, Flower SuperNode)",
           config_class="TelemetryConfig", check="shoal.daemons.telemetry.daemon:check_config",
           commands="shoal.daemons.telemetry.cli:add_commands",
           ports={"metrics": 9743},
           service=(
               ("ProcSubset", "all",
                "the collector reads /proc/stat, /proc/meminfo, /proc/diskstats and /proc/net/dev"),
               ("TimeoutStopSec", "20",
                "the graceful stop also stops the SuperNode (stop_timeout 10 s plus its own 5 s grace)"),
           )),
        _d("fedserver", "Shoal federated averaging server (Flower SuperLink, FedAvg runs)",
           config_class="FedserverConfig", check="shoal.daemons.fedserver.daemon:check_config",
           commands="shoal.daemons.fedserver.cli:add_commands",
           # The Fleet port was 9093 and the RPC 9094 (Alertmanager's ports): Debian's
           # alertmanager failed to start beside the fedserver.
           ports={"metrics": 9744, "fleet": 7443, "rpc": 7444},
           service=(
               ("TimeoutStopSec", "20",
                "the graceful stop also stops the SuperLink (stop_timeout 10 s plus its own 5 s grace)"),
           )),
    )
}

#: Default ``[daemon] metrics_listen`` port of each daemon (prometheus.yml follows it).
METRICS_PORTS: dict[str, int] = {name: d.ports["metrics"] for name, d in DAEMONS.items()}

#: Every default port of every daemon, ``(daemon, key) -> port``.
PORTS: dict[tuple[str, str], int] = {(name, key): port for name, d in DAEMONS.items() for key, port in d.ports.items()}
