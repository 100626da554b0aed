"""The telemetry daemon's config schema; every key is documented in configs/telemetry.toml."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS, PORTS

METRICS_PORT = METRICS_PORTS["telemetry"]


@dataclass(frozen=True, slots=True)
class CollectorSection:
    # Where /proc and /sys are read from ("/" except in tests).
    root: str = setting("/")
    # Seconds between samples.
    interval: float = setting(1.0, min=0.05, max=3600.0)
    # Window length in seconds: the seed uses 15 minutes.
    window: float = setting(900.0, min=0.1, max=86400.0)
    # A window with fewer samples than this is dropped (e.g. the one the daemon started in).
    min_samples: int = setting(2, min=1, max=1_000_000)
    # Query NVIDIA GPUs through nvidia-smi when it is installed.
    gpu: bool = setting(True)
    # Scrape an existing node_exporter too ("" disables), e.g. "http://127.0.0.1:9100/metrics".
    node_exporter_url: str = setting("")
    node_exporter_prefixes: tuple[str, ...] = setting(("node_",))
    # Also read one cgroup's CPU, memory and IO: "self" (the cgroup this daemon runs in: a
    # container's or an emulated lab host's workload), an absolute cgroup path, or "" (off).
    cgroup: str = setting("")

    def __post_init__(self) -> None:
        if not self.root.startswith("/"):
            raise ValueError("root: must be an absolute path")
        if self.window < 2 * self.interval:
            raise ValueError("window: must hold at least two samples (window >= 2 * interval)")
        if self.cgroup not in ("", "self") and (not self.cgroup.startswith("/") or ".." in self.cgroup.split("/")
                                                or "\0" in self.cgroup):
            raise ValueError('cgroup: must be "", "self" or an absolute cgroup path such as "/system.slice"')
        if self.node_exporter_url and not self.node_exporter_url.startswith(("http://", "https://")):
            raise ValueError("node_exporter_url: must be an http:// or https:// URL")


@dataclass(frozen=True, slots=True)
class StoreSection:
    # Windows kept in SQLite; the oldest go first. 35040 = one year of 15-minute windows.
    max_windows: int = setting(35040, min=10, max=10_000_000)


@dataclass(frozen=True, slots=True)
class DetectorSection:
    # A command run (no shell) when the node's verdict flips between normal and anomalous;
    # it gets SHOAL_ANOMALOUS, SHOAL_SCORE, SHOAL_THRESHOLD and SHOAL_WINDOW_START. "" = none.
    on_change_command: str = setting("")
    # The node's verdict (shoal_telemetry_node_anomalous, the worker's report to the dispatcher,
    # on_change_command) turns anomalous after this many anomalous windows in a row and normal
    # after as many normal ones: a window alone flags ~1 normal window in 50. 1 = each window.
    confirm: int = setting(3, min=1, max=1000)
    # A window (or a model) missing more than this share of the model's features is not scored
    # (or the model is refused as mismatched).
    max_missing_features: float = setting(0.1, min=0.0, max=1.0)


@dataclass(frozen=True, slots=True)
class TrainingSection:
    # The seed's 10 epochs, batch 10 and 98th percentile; its RMSProp learning rate (1e-6)
    # barely moves the weights in 10 epochs on one node's windows, so 1e-3 as in the experiment.
    epochs: int = setting(10, min=1, max=10_000)
    batch_size: int = setting(10, min=1, max=65536)
    lr: float = setting(1e-3, min=1e-9, max=1.0)
    percentile: float = setting(98.0, min=50.0, max=100.0)
    # The live recipe (docs/telemetry-model.md): more epochs when there are few windows, so
    # that training takes at least this many gradient steps in all ...
    min_steps: int = setting(1500, min=0, max=10_000_000)
    # ... and the threshold is the percentile of each window's error under a model trained
    # on the other windows (this many interleaved folds); 0 = of the training errors (the
    # seed's rule, which flags far more than 2 % of new normal windows on small data).
    folds: int = setting(5, min=0, max=100)
    # A window's feature may score up to this many training spans past the training range
    # (it is clipped there: a single wild sensor cannot dominate the score without limit) ...
    scale_margin: float = setting(1.0, min=0.0, max=1000.0)
    # ... and the threshold is this many times the percentile above (1 = the percentile itself).
    threshold_factor: float = setting(1.0, min=1.0, max=1000.0)
    # Train on at most this many of the newest normal (or unlabelled) windows ...
    max_windows: int = setting(20000, min=10, max=1_000_000)
    # ... and refuse to train on fewer than this.
    min_windows: int = setting(10, min=2, max=1_000_000)
    # Train on the features whose names start with one of these (e.g. ["cgroup_"]: the
    # node's own workload where the kernel is shared, with "cgroup_psi_" excluded: the
    # cgroup's pressure is its waits for the shared machine); [] = every feature of the node.
    features: tuple[str, ...] = setting(())
    # ... and not on those starting with one of these. The load averages by default: they are
    # the run queue (proc_running, a feature) averaged by the kernel over 1, 5 and 15 minutes,
    # so they carry minutes of the past into a window (a fault's end, the daemon's own training).
    exclude_features: tuple[str, ...] = setting(("load_",))


@dataclass(frozen=True, slots=True)
class FederationSection:
    # Run a Flower SuperNode so this node takes part in federated rounds.
    enabled: bool = setting(False)
    # The fedserver's SuperLink (Flower's Fleet API, host:port).
    superlink: ListenAddr = setting(ListenAddr("127.0.0.1", PORTS["fedserver", "fleet"]))
    # The SuperNode's local runtime API port (0 = any free port).
    supernode_port: int = setting(0, min=0, max=65535)
    # TLS: the CA certificate that signed the SuperLink's certificate. Required unless
    # the SuperLink is on loopback (then "" runs Flower in --insecure mode).
    root_certificates: str = setting("")
    # SuperNode authentication: this node's private key (its public key registered on the
    # SuperLink with `flwr supernode register`). Required with root_certificates.
    auth_private_key: str = setting("")
    # The fedserver's RPC address to fetch the latest global model from after downtime
    # ("" = no catch-up), and the file with its token (needed off loopback).
    fedserver: str = setting("")
    token_file: str = setting("")
    # Seconds between catch-up checks.
    catch_up_interval: float = setting(300.0, min=1.0, max=86400.0)

    def __post_init__(self) -> None:
        if self.fedserver:
            ListenAddr.parse(self.fedserver)  # raises ValueError with the reason
            if not ListenAddr.parse(self.fedserver).is_loopback and not self.token_file:
                raise ValueError("token_file: required when fedserver is not on loopback")
        if self.auth_private_key and not self.root_certificates:
            raise ValueError("auth_private_key: SuperNode authentication needs TLS (root_certificates)")
        if self.enabled and not self.superlink.is_loopback and not (
                self.root_certificates and self.auth_private_key):
            raise ValueError("root_certificates: a SuperLink off loopback needs TLS "
                             "(root_certificates) and node authentication (auth_private_key)")


@dataclass(frozen=True, slots=True)
class ControlSection:
    # The control socket for `shoal telemetry ...`; "" = <state directory>/control.sock.
    socket: str = setting("")

    def __post_init__(self) -> None:
        if self.socket and not self.socket.startswith("/"):
            raise ValueError("socket: must be an absolute path (or empty for the default)")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    collector: CollectorSection = setting(CollectorSection())
    store: StoreSection = setting(StoreSection())
    detector: DetectorSection = setting(DetectorSection())
    training: TrainingSection = setting(TrainingSection())
    federation: FederationSection = setting(FederationSection())
    control: ControlSection = setting(ControlSection())
