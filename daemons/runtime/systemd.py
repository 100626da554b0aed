"""systemd units for the Shoal daemons: one table row per daemon, one template.

Theory of operation
-------------------
Every daemon runs the same way (``shoal <name> run --config FILE``, Type=notify,
a watchdog, SIGHUP to reload, state under ``StateDirectory=``) inside the same
sandbox, so there is one unit template, :data:`SERVICE_TEMPLATE`, and a table,
:data:`DAEMONS`, of what differs: the description, the config file name and
``[Service]`` settings that one daemon needs changed or added (each with the
reason, which lands in the unit as a comment).

The files committed in ``systemd/`` are this module's output for
``/usr/local/bin/shoal`` and ``/etc/shoal``; ``tests/test_ops.py`` fails if
they drift. To add a daemon: add a row, reserve its metrics port in
:data:`METRICS_PORTS`, then regenerate the committed files with
``python -m shoal.daemons.runtime.systemd systemd/``.

:func:`install` writes the units and copies the default configs (never over an
operator's edited file unless asked). It does not run ``systemctl``; the
caller prints :func:`next_steps`.
"""

from __future__ import annotations

import importlib.resources
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DAEMONS",
    "METRICS_PORTS",
    "DaemonUnit",
    "install",
    "next_steps",
    "render_units",
]

DEFAULT_EXE = "/usr/local/bin/shoal"
DEFAULT_CONFIG_DIR = "/etc/shoal"
TARGET = "shoal.target"
SYSUSERS_FILE = "shoal-sysusers.conf"

#: Default ``[daemon] metrics_listen`` port of each daemon, reserved here so
#: that two daemons on one node never collide and prometheus.yml can follow.
METRICS_PORTS = {
    "tracker": 9741,
    "peer": 9742,
    "telemetry": 9743,
    "fedserver": 9744,
    "checkpoint": 9745,
    "dispatcher": 9746,
    "worker": 9747,
}


@dataclass(frozen=True, slots=True)
class DaemonUnit:
    """What the unit of one daemon has that the template does not."""

    name: str
    description: str
    config: str = ""  # file name under the config dir; default "<name>.toml"
    #: ``(key, value, why)``: replaces every ``key=`` line of the template
    #: (value None removes it), or is appended to ``[Service]`` if the
    #: template has no such key. ``why`` becomes a comment in the unit.
    service: tuple[tuple[str, str | None, str], ...] = ()

    @property
    def unit(self) -> str:
        return f"shoal-{self.name}.service"

    @property
    def config_file(self) -> str:
        return self.config or f"{self.name}.toml"


DAEMONS: dict[str, DaemonUnit] = {
    d.name: d
    for d in (
        DaemonUnit(
            "tracker",
            "Shoal BitTorrent tracker (HTTP and UDP announce/scrape)",
            service=(
                ("LimitNOFILE", "65536", "one descriptor per open HTTP announce connection"),
            ),
        ),
        DaemonUnit(
            "peer",
            "Shoal BitTorrent peer (downloads and seeds torrents)",
            service=(
                ("LimitNOFILE", "65536", "one descriptor per peer connection and per open torrent file"),
            ),
        ),
        DaemonUnit(
            "checkpoint",
            "Shoal checkpoint coordinator or backup (in-memory N+1 parity of application checkpoints)",
            service=(
                ("LimitNOFILE", "65536", "three RPC connections per rank of every group"),
            ),
        ),
        DaemonUnit(
            "dispatcher",
            "Shoal dispatcher (DAG jobs of dependent tasks, pulled by workers)",
            service=(
                ("LimitNOFILE", "65536", "one descriptor per worker and client connection"),
            ),
        ),
        DaemonUnit(
            "worker",
            "Shoal worker (runs the dispatcher's tasks, each in its own process)",
            service=(
                ("MemoryDenyWriteExecute", "no",
                 "tasks may be JIT runtimes (Java, Node.js, PyPy) that need writable+executable memory"),
                ("LimitNOFILE", "65536", "two pipes per running task and the dispatcher connection"),
            ),
        ),
        DaemonUnit(
            "telemetry",
            "Shoal node telemetry (collector, ONNX anomaly detector, Flower SuperNode)",
            service=(
                ("ProcSubset", "all",
                 "the collector reads /proc/stat, /proc/meminfo, /proc/diskstats and /proc/net/dev"),
                ("TimeoutStopSec", "20",
                 "the graceful stop also stops the SuperNode (stop_timeout 10 s plus its own 5 s grace)"),
            ),
        ),
        DaemonUnit(
            "fedserver",
            "Shoal federated averaging server (Flower SuperLink, FedAvg runs)",
            service=(
                ("TimeoutStopSec", "20",
                 "the graceful stop also stops the SuperLink (stop_timeout 10 s plus its own 5 s grace)"),
            ),
        ),
    )
}

# Placeholders: {name} {description} {exe} {config}. Literal braces: none.
SERVICE_TEMPLATE = """\
# {unit}: {description}.
#
# Generated by `shoal systemd render` from shoal/daemons/runtime/systemd.py;
# change that, not this file. Local changes belong in a drop-in
# (`systemctl edit {unit}`). docs/operations.md explains every setting.

[Unit]
Description={description}
# `systemctl stop|restart shoal.target` reaches every Shoal daemon on the node.
PartOf=shoal.target
# Listeners may be bound to a specific address: wait until the network is up.
Wants=network-online.target
After=network-online.target
# A daemon that crashes 5 times in 5 minutes stays down (and alerts) instead
# of flapping; `systemctl reset-failed {unit}` re-arms it.
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
# The daemon sends READY=1 once its sockets are bound, STATUS= lines, and
# STOPPING=1; only the main process may talk to the service manager.
Type=notify
NotifyAccess=main
ExecStart={exe} {name} run --config {config}
# SIGHUP re-reads the config; a bad file is logged and the old one kept.
ExecReload=/bin/kill -HUP $MAINPID
# WATCHDOG=1 comes every 15 s from the event loop: a wedged loop is killed
# (SIGABRT) and restarted.
WatchdogSec=30
Restart=on-failure
RestartSec=5
# SIGTERM starts a graceful stop bounded by [daemon] stop_timeout (10 s by
# default); this must stay a little larger, or state saves get cut short.
TimeoutStopSec=15
SyslogIdentifier=shoal-{name}
# $STATE_DIRECTORY=/var/lib/shoal-{name}, private to the service.
StateDirectory=shoal-{name}
StateDirectoryMode=0700

# --- Sandbox ---------------------------------------------------------------
# `systemd-analyze security` rates every Shoal unit at 2.0 or less
# ("OK"; tests/test_ops.py checks it). What is left is mostly the network,
# which a network service needs; restrict it per site with IPAddressAllow=
# and IPAddressDeny= in a drop-in.

# Run as an unprivileged user allocated at start ("shoal"; if
# shoal-sysusers.conf created a static user of that name, that one is used).
# DynamicUser also implies RemoveIPC= and that nothing outside the state
# directory is writable.
DynamicUser=yes
User=shoal
Group=shoal
# No capabilities at all, and no way to gain any (setuid binaries, file caps).
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
# A user namespace mapping only root and the daemon's own user: every other
# user is "nobody" inside, and root inside has no power outside.
PrivateUsers=yes
# /usr, /boot, /etc read-only (/etc is where the config is); /home, /root and
# /run/user hidden; a private /tmp and /var/tmp; no device nodes but null,
# zero, random and friends; a private SysV IPC namespace and mount table.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateIPC=yes
PrivateMounts=yes
# No writing kernel tunables (/proc/sys, /sys), loading modules, reading the
# kernel log, changing cgroups, setting the clock or the hostname.
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other processes are invisible in /proc, and of /proc only the per-process
# part is there (the daemon reads nothing system-wide from it).
ProtectProc=invisible
ProcSubset=pid
# Internet sockets to serve and AF_UNIX for sd_notify and the journal; no
# netlink, packet or other families.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
# No new namespaces, realtime scheduling, setuid/setgid files, execution
# domain changes, or memory both writable and executable (CPython needs none).
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
KeyringMode=private
# The system calls of an ordinary service, minus those that need privileges
# or change resource limits, scheduling or NUMA policy; a denied call fails
# with EPERM rather than killing the process. Native architecture only.
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
# Files the daemon creates are private to it.
UMask=0077

[Install]
WantedBy=shoal.target
"""

TARGET_TEXT = """\
# shoal.target: the Shoal daemons of this node.
#
# Generated by `shoal systemd render` from shoal/daemons/runtime/systemd.py.
# Each shoal-*.service is WantedBy= and PartOf= this target, so enabling a
# service adds it to the target, and stopping or restarting the target stops
# or restarts every daemon of the node. A node runs only the daemons of its
# role: enable those, e.g.
#   systemctl enable --now shoal.target shoal-tracker.service

[Unit]
Description=Shoal cluster daemons
Wants=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target
"""

# Characters allowed in the executable and config paths written into units:
# no whitespace or quotes (word splitting), no '$' (variable expansion) and
# no '%' (specifiers), so no escaping is ever needed.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@:,=-]*$")


def _checked_path(what: str, path: str) -> str:
    if not _SAFE_PATH.match(path):
        raise ValueError(
            f"{what} {path!r} must be an absolute path of letters, digits and _./+@:,=- only"
        )
    return path.rstrip("/") or "/"


def _render_service(d: DaemonUnit, exe: str, config_dir: str) -> str:
    text = SERVICE_TEMPLATE.format(
        unit=d.unit,
        name=d.name,
        description=d.description,
        exe=exe,
        config=f"{config_dir}/{d.config_file}",
    )
    lines = text.splitlines()
    appended: list[str] = []
    for key, value, why in d.service:
        hits = [i for i, line in enumerate(lines) if line.startswith(key + "=")]
        replacement = [f"# {d.unit}: {why}"]
        replacement.append(f"{key}={value}" if value is not None else f"# ({key}= removed)")
        if not hits:
            if value is None:
                raise ValueError(f"{d.name}: cannot remove {key}=, the template does not set it")
            appended += replacement
            continue
        for i in reversed(hits[1:]):
            del lines[i]
        lines[hits[0] : hits[0] + 1] = replacement
    if appended:
        at = lines.index("[Install]")
        lines[at:at] = ["# --- Specific to this daemon -------------------------------------------", *appended, ""]
    return "\n".join(lines) + "\n"


def render_units(shoal_exe: str, *, config_dir: str = DEFAULT_CONFIG_DIR) -> dict[str, str]:
    """Unit file name -> text, for every daemon in :data:`DAEMONS` and the target."""
    exe = _checked_path("shoal executable", shoal_exe)
    cdir = _checked_path("config directory", str(config_dir))
    units = {d.unit: _render_service(d, exe, cdir) for d in DAEMONS.values()}
    units[TARGET] = TARGET_TEXT
    return units


def _packaged(package: str, checkout_folder: str):
    """The data folder shipped as ``package`` (``shoal.configs``, ``shoal.systemd``).

    From a wheel this is importlib.resources. An editable install of a
    folder without ``__init__.py`` cannot be read that way on Python 3.11
    (its namespace path holds a placeholder that is not a directory), so fall
    back to the folder of the checkout this module lives in.
    """
    try:
        return importlib.resources.files(package)
    except (ModuleNotFoundError, NotADirectoryError):
        folder = Path(__file__).resolve().parents[2] / checkout_folder
        if not folder.is_dir():
            raise
        return folder


def default_config(name: str) -> str:
    """The shipped, commented default config of daemon ``name``."""
    return (_packaged("shoal.configs", "configs") / DAEMONS[name].config_file).read_text(encoding="utf-8")


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def install(
    unit_dir: Path,
    *,
    shoal_exe: str,
    config_dir: Path,
    overwrite_configs: bool = False,
    sysusers_dir: Path | None = None,
) -> list[Path]:
    """Write the units to ``unit_dir`` and missing default configs to ``config_dir``.

    Units are always replaced (they are generated; local changes belong in
    drop-ins). A config file that exists is left alone unless
    ``overwrite_configs``. With ``sysusers_dir`` (``/etc/sysusers.d``), also
    write the static ``shoal`` user; run ``systemd-sysusers`` afterwards.
    Returns the paths written. Runs no systemctl: print :func:`next_steps`.
    """
    written: list[Path] = []
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_units(shoal_exe, config_dir=str(config_dir)).items():
        _write(unit_dir / name, text, 0o644)
        written.append(unit_dir / name)
    # The daemons read their config as an unprivileged user: 0644 in a 0755
    # directory. Files holding secrets (passkeys) are the operator's to add
    # with tighter modes; see docs/operations.md.
    config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    for d in DAEMONS.values():
        target = config_dir / d.config_file
        if target.exists() and not overwrite_configs:
            continue
        _write(target, default_config(d.name), 0o644)
        written.append(target)
    if sysusers_dir is not None:
        sysusers_dir.mkdir(parents=True, exist_ok=True)
        text = (_packaged("shoal.systemd", "systemd") / SYSUSERS_FILE).read_text(encoding="utf-8")
        target = sysusers_dir / "shoal.conf"
        _write(target, text, 0o644)
        written.append(target)
    return written


def next_steps(daemons: Iterable[str] | None = None) -> str:
    """The systemctl command that loads the units and starts ``daemons`` now and at boot."""
    names = list(DAEMONS) if daemons is None else list(daemons)
    units = " ".join(DAEMONS[n].unit for n in names)
    return f"systemctl daemon-reload && systemctl enable --now {TARGET} {units}".rstrip()


def _main(argv: list[str]) -> int:
    """``python -m shoal.daemons.runtime.systemd DIR``: regenerate the committed units."""
    if len(argv) != 1:
        print("usage: python -m shoal.daemons.runtime.systemd DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for name, text in render_units(DEFAULT_EXE, config_dir=DEFAULT_CONFIG_DIR).items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
