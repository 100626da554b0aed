"""The worker's config schema; every key is documented in configs/worker.toml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    # Seconds between saves of the marl scheduler's weights (also saved on stop).
    policy_save_interval: float = setting(60.0, min=1.0, max=86400.0)
    # This node's telemetry daemon's /metrics URL, read every heartbeat_interval; its
    # anomaly verdict goes with the heartbeats (the dispatcher's exclude_anomalous). "" = off.
    telemetry_metrics: str = setting("")

    def __post_init__(self) -> None:
        if self.telemetry_metrics and not self.telemetry_metrics.startswith(("http://", "https://")):
            raise ValueError("telemetry_metrics: must be an http:// or https:// URL (or empty)")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    worker: WorkerSection = setting(WorkerSection())
