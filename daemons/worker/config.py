"""The worker's config schema; every key is documented in configs/worker.toml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.core.dispatch.policy import QUEUE_POLICIES
from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS

METRICS_PORT = METRICS_PORTS["worker"]


@dataclass(frozen=True, slots=True)
class WorkerSection:
    # The dispatcher's rpc_listen address.
    dispatcher: ListenAddr = setting(ListenAddr("127.0.0.1", 7460))
    # File holding the dispatcher's HMAC token; "" = none (loopback only).
    token_file: Path | None = setting(None)
    # This worker's name at the dispatcher; "" = the host name.
    id: str = setting("")
    # Tasks run at once (each in its own process); 0 = the number of cores.
    slots: int = setting(0, min=0, max=4096)
    # Units pulled ahead of free slots, so a slot never waits for a round trip; 0 = slots.
    prefetch: int = setting(0, min=0, max=4096)
    # Order of the local queue: fcfs, sjf, edf or marl (seed 004's learned scheduler).
    queue_policy: str = setting("fcfs", choices=QUEUE_POLICIES)
    # Capacity advertised to the dispatch policies. 0 = detect (cpus: slots;
    # memory: MemTotal of /proc/meminfo).
    cpus: float = setting(0.0, min=0.0, max=4096.0)
    memory: int = setting(0, min=0, max=1 << 50)
    cpu_speed: float = setting(1.0, min=1e-6, max=1e12)
    bandwidth: float = setting(125_000_000.0, min=1.0, max=1e13)
    # Where tasks run (a directory per task with inputs or outputs); "" = <state>/work.
    work_dir: Path | None = setting(None)
    # Bytes of stdout and of stderr kept per task; the rest is dropped and counted.
    max_log_bytes: int = setting(65536, min=0, max=1 << 20)
    # Largest input file fetched from a URL or copied from a path.
    max_input_bytes: int = setting(1 << 30, min=1, max=1 << 40)
    # Seconds between heartbeats; must be well under the dispatcher's lease_seconds.
    heartbeat_interval: float = setting(2.0, min=0.05, max=600.0)
    # Seconds between attempts to reach the dispatcher.
    reconnect_interval: float = setting(1.0, min=0.05, max=600.0)
    # The swarm hook: the peer daemon's control socket, for swarm:FILE.torrent inputs; "" = none.
    peer_socket: Path | None = setting(None)
    # Data between tasks: the output server's address, the URL others use for it
    # ("" = http://<outputs_listen>), how long a job's outputs stay after it ended,
    # and (with peer_socket) the tracker to seed them through the swarm ("" = HTTP only).
    outputs_listen: ListenAddr = setting(ListenAddr("127.0.0.1", 0))
    outputs_url: str = setting("")
    output_retention: float = setting(3600.0, min=0.0, max=365 * 86400.0)
    publish_tracker: str = setting("")
    # Seconds between saves of the marl scheduler's weights (also saved on stop).
    policy_save_interval: float = setting(60.0, min=1.0, max=86400.0)
    # This node's telemetry daemon's /metrics URL, read every heartbeat_interval; its
    # anomaly verdict goes with the heartbeats (the dispatcher's exclude_anomalous). "" = off.
    telemetry_metrics: str = setting("")
    # The user tasks run as (a name or a numeric uid): never a daemon's user, so a
    # task cannot signal the daemons. A dedicated user is best; nobody works anywhere.
    task_user: str = setting("nobody")
    # The tasks' group (a name or a gid); "" = the task user's own group.
    task_group: str = setting("")
    # A worker that may not switch to task_user (not root, no CAP_SETUID/CAP_SETGID):
    # "refuse" = it does not start; "self" = tasks run as the worker's own user (a
    # developer's laptop; said once in the log).
    when_unprivileged: Literal["refuse", "self"] = "refuse"
    # Where task cgroups are made (each task's cpus and memory enforced there):
    # "auto" = the worker's own cgroup v2 directory when it may write it (systemd's
    # Delegate=yes); "off" = process groups only; or a directory: a cgroup v2
    # directory, or a cgroup v1 memory controller directory. Without one, limits are
    # not enforced (said once in the log).
    cgroup: str = setting("auto")
    # With a v1 memory directory in cgroup: a v1 cpu controller directory for cpu
    # quotas; "" = cpus not enforced.
    cgroup_cpu: Path | None = setting(None)

    def __post_init__(self) -> None:
        if self.telemetry_metrics and not self.telemetry_metrics.startswith(("http://", "https://")):
            raise ValueError("telemetry_metrics: must be an http:// or https:// URL (or empty)")
        if not self.task_user:
            raise ValueError("task_user: required (a user name or a numeric uid)")
        for key in ("outputs_url", "publish_tracker"):
            value = getattr(self, key)
            if value and not value.startswith(("http://", "https://")):
                raise ValueError(f"{key}: must be an http:// or https:// URL (or empty)")
        if self.cgroup not in ("auto", "off") and not self.cgroup.startswith("/"):
            raise ValueError("cgroup: expected auto, off or an absolute directory")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    worker: WorkerSection = setting(WorkerSection())
