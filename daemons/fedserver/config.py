"""The fedserver's config schema; every key is documented in configs/fedserver.toml."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS, PORTS

METRICS_PORT = METRICS_PORTS["fedserver"]


@dataclass(frozen=True, slots=True)
class SuperLinkSection:
    # Where the SuperNodes dial (port 0 = any free port, for tests). Without TLS Flower's
    # SuperLink serves all its APIs here; with TLS the fedserver's Fleet-only proxy
    # (proxy.py) serves it and the SuperLink listens on a free loopback port.
    listen: ListenAddr = setting(ListenAddr("127.0.0.1", PORTS["fedserver", "fleet"]))
    # TLS certificate (naming 127.0.0.1 too), key and CA for the SuperLink and the proxy.
    # Required unless listen is loopback; on loopback "" runs Flower in --insecure mode.
    ssl_certfile: str = setting("")
    ssl_keyfile: str = setting("")
    ssl_ca_certfile: str = setting("")
    # Only SuperNodes whose public keys were registered (`flwr supernode register`) may
    # connect. Required unless listen is loopback.
    supernode_auth: bool = setting(False)
    # With supernode_auth: a file of the nodes' OpenSSH public keys (EC, e.g. P-384), one a
    # line, '#' comments allowed; the daemon registers every key with the SuperLink at start.
    authorized_keys: str = setting("")

    def __post_init__(self) -> None:
        tls = (self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile)
        if any(tls) and not all(tls):
            raise ValueError("ssl_certfile: TLS needs all three of ssl_certfile, ssl_keyfile and ssl_ca_certfile")
        if self.supernode_auth and not all(tls):
            raise ValueError("supernode_auth: Flower's SuperNode authentication needs TLS "
                             "(ssl_certfile, ssl_keyfile, ssl_ca_certfile)")
        if self.authorized_keys and not self.supernode_auth:
            raise ValueError("authorized_keys: only meaningful with supernode_auth = true")
        if not self.listen.is_loopback:
            if not (self.ssl_certfile and self.ssl_keyfile and self.ssl_ca_certfile):
                raise ValueError("ssl_certfile: a SuperLink off loopback needs TLS (ssl_certfile, "
                                 "ssl_keyfile, ssl_ca_certfile): anyone reaching it could run code on every node")
            if not self.supernode_auth:
                raise ValueError("supernode_auth: must be true for a SuperLink off loopback")


@dataclass(frozen=True, slots=True)
class RpcSection:
    # Control RPC (`shoal fed run`, node catch-up). Off loopback it needs token_file.
    listen: ListenAddr = setting(ListenAddr("127.0.0.1", PORTS["fedserver", "rpc"]))
    # A file holding the shared token (at least 16 bytes); "" = no token (loopback only).
    token_file: str = setting("")

    def __post_init__(self) -> None:
        if not self.listen.is_loopback and not self.token_file:
            raise ValueError("token_file: required when rpc listen is not loopback")


@dataclass(frozen=True, slots=True)
class FederationSection:
    # Seconds between scheduled FedAvg runs; 0 = only on demand (`shoal fed run`).
    interval: float = setting(0.0, min=0.0, max=30 * 86400.0)
    # FedAvg rounds per run (the seed saw no gain beyond a few).
    rounds: int = setting(3, min=1, max=1000)
    # Local training per round on each node: epochs, RMSProp learning rate, batch size.
    local_epochs: int = setting(1, min=1, max=1000)
    lr: float = setting(1e-3, min=1e-9, max=1.0)
    batch_size: int = setting(32, min=1, max=65536)
    # A run needs this many nodes with training windows, and waits this long for them.
    min_nodes: int = setting(2, min=1, max=100_000)
    wait_nodes: float = setting(120.0, min=1.0, max=86400.0)
    # How long one round may wait for the nodes' replies.
    round_timeout: float = setting(600.0, min=5.0, max=86400.0)
    # Seed of the initial weights.
    seed: int = setting(0, min=0, max=2**31 - 1)


@dataclass(frozen=True, slots=True)
class FedserverConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    superlink: SuperLinkSection = setting(SuperLinkSection())
    rpc: RpcSection = setting(RpcSection())
    federation: FederationSection = setting(FederationSection())
