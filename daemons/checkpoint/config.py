"""The checkpoint daemon's config schema; every key is documented in configs/checkpoint.toml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.core.checkpoint.parity import MAX_BLOCK_SIZE
from shoal.daemons.runtime.config import ConfigError, DaemonSection, ListenAddr, read_token, setting
from shoal.daemons.runtime.registry import METRICS_PORTS, PORTS

METRICS_PORT = METRICS_PORTS["checkpoint"]
RPC_PORT = PORTS["checkpoint", "rpc"]
BACKUP_PORT = PORTS["checkpoint", "backup"]
TOKEN_KEY = "checkpoint.token_file"


@dataclass(frozen=True, slots=True)
class CheckpointSection:
    # coordinator: the seed's checkpoint processor P_c (holds the parity, grants
    # checkpoints, runs recovery). backup: P_b (holds a mirror of the parity).
    role: Literal["coordinator", "backup"] = "coordinator"
    # RPC listener (the runtime transport). Loopback by default; any other
    # address needs token_file (the RPC server refuses to start without it).
    listen: ListenAddr = setting(ListenAddr("127.0.0.1", RPC_PORT))
    # Coordinator only: the backup's RPC address; "" runs without a backup.
    backup: ListenAddr | None = setting(None)
    # File holding the shared HMAC token (>= 16 bytes) of every RPC in a group:
    # ranks, coordinator and backup. "" = no token (loopback only).
    token_file: Path | None = setting(None)
    # Default mode of a new group (a group may ask for its own at join).
    mode: Literal["blocking", "enhanced"] = "enhanced"
    # Default block size in bytes of the XOR deltas (the seed's page).
    block_size: int = setting(65536, min=512, max=MAX_BLOCK_SIZE)
    # Parity shards: 1 = the seed's N+1 XOR parity; 2..4 = Reed-Solomon with m
    # parity shards, surviving any m simultaneous rank failures.
    parity_shards: int = setting(1, min=1, max=4)
    # Seconds a rank's long-poll (its heartbeat) lasts; ranks call again at once.
    heartbeat_interval: float = setting(1.0, min=0.05, max=60.0)
    # A rank not heard from for this long is declared failed (a closed
    # connection is detected at once).
    heartbeat_timeout: float = setting(5.0, min=0.2, max=600.0)
    # Mean time between failures, seconds, for Vaidya's model (lambda = 1/MTBF).
    mtbf: float = setting(86400.0, min=1.0, max=1e10)
    # Bounds: groups, ranks per group, bytes of checkpoint state per rank.
    max_groups: int = setting(64, min=1, max=10_000)
    max_ranks: int = setting(256, min=1, max=4096)
    max_state_bytes: int = setting(8 << 30, min=1 << 16, max=1 << 40)
    # Largest RPC frame in bytes; deltas and recovery data travel in chunks
    # below it. Each connection may pin one frame of this size in memory.
    max_frame: int = setting(8 << 20, min=1 << 20, max=64 << 20)
    # Seconds a finished or failed group is kept (late calls of its ranks are
    # answered, a join is refused group_over) before it is freed; its parity is
    # freed at once. Only live groups count against max_groups.
    finished_grace: float = setting(5.0, min=0.0, max=3600.0)
    # After a coordinator restart: seconds for every rank of a group to join
    # again; past it the group fails (reason logged, recoveries_total{failed}).
    rebuild_timeout: float = setting(30.0, min=0.5, max=3600.0)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout: must exceed heartbeat_interval")
        if self.role == "backup" and self.backup is not None:
            raise ValueError("backup: only a coordinator has a backup")


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    checkpoint: CheckpointSection = setting(CheckpointSection())


def check_config(cfg: CheckpointConfig) -> None:
    """Validation beyond the schema (`shoal config check`): the token file, loopback rule."""
    c = cfg.checkpoint
    token = read_token(c.token_file, TOKEN_KEY)
    if token is None and not c.listen.is_loopback:
        raise ConfigError("checkpoint", "checkpoint.listen",
                          "a non-loopback listener needs token_file (RPC is authenticated off loopback)")
