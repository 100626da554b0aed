"""The dispatcher's config schema; every key is documented in configs/dispatcher.toml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.core.dispatch.policy import DISPATCH_POLICIES
from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS, PORTS

DEFAULT_PORT = PORTS["dispatcher", "rpc"]
METRICS_PORT = METRICS_PORTS["dispatcher"]


@dataclass(frozen=True, slots=True)
class DispatcherSection:
    # Where workers and `shoal submit` reach the dispatcher (the runtime's RPC).
    # Off loopback a token_file is required: the RPC refuses to start without one.
    rpc_listen: ListenAddr = setting(ListenAddr("127.0.0.1", DEFAULT_PORT))
    # File holding the shared HMAC token (at least 16 bytes); "" = no token.
    token_file: Path | None = setting(None)
    # Dispatch policy for jobs that do not name one.
    policy: str = setting("least-load", choices=DISPATCH_POLICIES)
    # Seed of the policies' random generators (random, dqn exploration).
    policy_seed: int = setting(0, min=0, max=2**31 - 1)
    # A worker silent this long is dead: its units go back to the queue.
    lease_seconds: float = setting(15.0, min=0.5, max=3600.0)
    # Bounds on one submission.
    max_spec_bytes: int = setting(512 * 1024, min=1024, max=900 * 1024)
    max_tasks_per_job: int = setting(10_000, min=1, max=1_000_000)
    # Seconds a finished job is kept (its tasks, results, logs) before it is pruned; 0 = forever.
    job_retention: float = setting(30 * 86400.0, min=0.0, max=10 * 365 * 86400.0)
    # Units not finished across all jobs; submissions beyond are refused (busy).
    max_pending_units: int = setting(1_000_000, min=1, max=10_000_000)
    # Units handed out by one pull.
    max_pull: int = setting(256, min=1, max=4096)
    # Bytes of stdout and of stderr kept per task (workers truncate first).
    max_log_bytes: int = setting(65536, min=0, max=1 << 20)
    # "normal": commits survive kill -9; "full": also a power cut (fsync each commit).
    durability: Literal["normal", "full"] = "normal"
    # Seconds between saves of learned policy weights (also saved on stop).
    policy_save_interval: float = setting(60.0, min=1.0, max=86400.0)
    # Stop dispatching to workers that report their node anomalous (the telemetry
    # daemon's verdict, read by the worker: [worker] telemetry_metrics); they get work
    # again when they report it normal.
    exclude_anomalous: bool = setting(False)
    # Concurrent RPC requests (each worker holds one long poll).
    max_rpc_in_flight: int = setting(256, min=4, max=65536)
    # The unix socket `shoal submit` uses: every local user may connect, and the
    # kernel's peer credentials (SO_PEERCRED) say who it is; only submit_users and
    # members of submit_groups may submit (or exclude workers). "" =
    # $RUNTIME_DIRECTORY/submit.sock under systemd, else <state_directory>/submit.sock.
    submit_socket: Path | None = setting(None)
    # Users (names or numeric uids) allowed to submit through submit_socket.
    submit_users: tuple[str, ...] = ("root",)
    # Groups (names or gids) whose members may submit through submit_socket.
    submit_groups: tuple[str, ...] = ("shoal-submit",)

    def __post_init__(self) -> None:
        if not self.rpc_listen.is_loopback and self.token_file is None:
            raise ValueError("token_file: required when rpc_listen is not on loopback")


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    dispatcher: DispatcherSection = setting(DispatcherSection())
