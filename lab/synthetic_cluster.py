"""A synthetic HPC cluster: telemetry windows for K similar-but-not-identical nodes.

Theory of operation
-------------------
The seed's data (Marconi100, 70 nodes, 460 features = mean and standard deviation of
~230 metrics over 15-minute windows, ~13,000 windows per node, ~3% anomalous) is not
public, so the experiment runs on windows produced here. The generator is a latent
factor model, deterministic for a given ``ClusterSpec`` and node index:

* **Metrics.** ``features // 2`` metrics named like the collector's (per-CPU
  utilisation and frequency, load, memory and swap, disk and network rates, hwmon
  temperatures and fans, RAPL power, GPU utilisation/memory/temperature/power,
  process counts). Each metric *kind* responds to six latent load factors
  (cpu, mem, io, net, gpu, heat) through a loading vector; each metric instance
  (``cpu7_util``) jitters its kind's loading, identically on every node.
* **Workloads.** A shared pool of job types, each a point in factor space (idle,
  CPU-bound, memory-bound, I/O-heavy, MPI/network, GPU training, ...). Every node
  runs its own mix of them (a Dirichlet draw, so nodes differ in what they mostly
  do) as a Markov chain: a job lasts a geometric number of windows (mean 8, two
  hours at 15 min). Within a job the factors wander a little.
* **Similar, not identical.** Each node has its own gains and offsets on every
  metric (sensor calibration, silicon lottery, position in the rack): a few percent
  of the metric's range.
* **Features.** A window's mean of a metric is a saturating function of its factors
  plus noise; its standard deviation grows with the factor activity plus noise.
* **Faults** replace normal behaviour for an episode of 1-6 consecutive windows,
  with a random severity, in six kinds modelled on the HPC performance anomaly suite
  (HPAS) and the seed's Nagios-flagged conditions: ``cpu_hog`` (a rogue process
  saturates cores, more running processes, more power), ``mem_leak`` (used memory
  ramps, swap grows, cache shrinks, blocked processes), ``io_contention`` (disk rates
  and blocked processes up, CPU waits), ``net_contention`` (network rates and errors
  up, MPI jobs stall), ``thermal`` (a fan stops or fans max out, temperatures rise,
  clocks throttle) and ``slow_node`` (clock capped low, power down, jobs linger).
* **Scarce normal data.** A share of the nodes (``scarce_share``) are young: they
  have only ``scarce_windows`` of the usual window count and a higher fault rate,
  which is exactly where a per-node model starves and federation should help.

Labels: 0 normal, 1..6 the fault kind (``FAULT_KINDS[label - 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACTORS = ("cpu", "mem", "io", "net", "gpu", "heat")
FAULT_KINDS = ("cpu_hog", "mem_leak", "io_contention", "net_contention", "thermal", "slow_node")

# metric kind -> (relative count, baseline, loading on FACTORS, noise, physical scale, unit)
_KINDS = {
    "cpu_util":     (24, 0.05, (1.00, 0.00, 0.10, 0.05, 0.05, 0.00), 0.04, 100.0, "pct"),
    "cpu_freq":     (24, 0.55, (0.35, 0.00, 0.00, 0.00, 0.00, -0.10), 0.03, 3800.0, "mhz"),
    "load":         (3, 0.05, (0.80, 0.00, 0.30, 0.10, 0.10, 0.00), 0.03, 64.0, "procs"),
    "mem":          (6, 0.10, (0.10, 0.90, 0.10, 0.00, 0.05, 0.00), 0.02, 256e9, "bytes"),
    "swap":         (2, 0.02, (0.00, 0.15, 0.00, 0.00, 0.00, 0.00), 0.01, 16e9, "bytes"),
    "disk":         (12, 0.02, (0.05, 0.05, 0.90, 0.00, 0.00, 0.00), 0.03, 2e9, "bps"),
    "net":          (8, 0.02, (0.05, 0.00, 0.05, 0.90, 0.05, 0.00), 0.03, 12.5e9, "bps"),
    "net_errs":     (2, 0.01, (0.00, 0.00, 0.00, 0.05, 0.00, 0.00), 0.01, 1e3, "per_s"),
    "temp":         (20, 0.30, (0.45, 0.00, 0.00, 0.00, 0.15, 0.40), 0.02, 100.0, "celsius"),
    "fan":          (8, 0.30, (0.30, 0.00, 0.00, 0.00, 0.15, 0.50), 0.02, 12000.0, "rpm"),
    "power":        (6, 0.15, (0.70, 0.15, 0.05, 0.05, 0.00, 0.05), 0.03, 300.0, "watts"),
    "gpu_util":     (4, 0.02, (0.05, 0.00, 0.00, 0.00, 1.00, 0.00), 0.03, 100.0, "pct"),
    "gpu_mem":      (4, 0.05, (0.00, 0.10, 0.00, 0.00, 0.85, 0.00), 0.02, 32e9, "bytes"),
    "gpu_temp":     (4, 0.30, (0.00, 0.00, 0.00, 0.00, 0.50, 0.30), 0.02, 100.0, "celsius"),
    "gpu_power":    (4, 0.10, (0.00, 0.00, 0.00, 0.00, 0.80, 0.05), 0.03, 300.0, "watts"),
    "procs":        (3, 0.10, (0.50, 0.05, 0.20, 0.10, 0.05, 0.00), 0.03, 2000.0, "count"),
}

# Shared job types: points in FACTORS space (cpu, mem, io, net, gpu, heat).
_JOB_TYPES = np.array([
    (0.02, 0.05, 0.02, 0.02, 0.00, 0.10),  # idle
    (0.90, 0.30, 0.05, 0.05, 0.00, 0.60),  # CPU-bound solver
    (0.50, 0.85, 0.10, 0.05, 0.00, 0.40),  # memory-bound
    (0.30, 0.30, 0.80, 0.10, 0.00, 0.30),  # I/O heavy (checkpointing, analytics)
    (0.70, 0.40, 0.10, 0.80, 0.00, 0.50),  # MPI, network-bound
    (0.30, 0.50, 0.20, 0.20, 0.95, 0.70),  # GPU training
    (0.20, 0.40, 0.30, 0.10, 0.60, 0.50),  # GPU inference / mixed
    (0.60, 0.60, 0.40, 0.40, 0.30, 0.50),  # mixed workflow
    (0.95, 0.20, 0.00, 0.30, 0.00, 0.80),  # dense linear algebra, hot
    (0.15, 0.15, 0.50, 0.50, 0.00, 0.20),  # data movement
], dtype=np.float64)


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 70
    features: int = 460           # even: mean and std of features // 2 metrics
    windows: int = 13_000         # per ordinary node
    anomaly_rate: float = 0.03    # share of windows inside fault episodes, ordinary nodes
    scarce_share: float = 0.2     # share of nodes with scarce normal data
    scarce_windows: float = 0.1   # their window count relative to `windows`
    scarce_anomaly_rate: float = 0.08
    node_spread: float = 0.05     # per-node gain/offset spread, in units of a metric's range
    severity: tuple[float, float] = (0.3, 1.0)  # fault strength range
    seed: int = 0

    def __post_init__(self):
        if self.nodes < 1 or self.windows < 20:
            raise ValueError("need at least 1 node and 20 windows per node")
        if self.features < 2 or self.features % 2:
            raise ValueError("features must be an even number >= 2 (mean and std per metric)")
        for name in ("anomaly_rate", "scarce_share", "scarce_windows", "scarce_anomaly_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    @property
    def metrics(self) -> int:
        return self.features // 2

    def is_scarce(self, node: int) -> bool:
        """The last ``scarce_share`` of the nodes are the young ones."""
        n_scarce = int(round(self.scarce_share * self.nodes))
        return node >= self.nodes - n_scarce


@dataclass
class Catalogue:
    """The cluster-wide metric layout (identical on every node)."""

    names: list[str]            # metric names, len M
    kinds: list[str]            # kind of each metric
    base: np.ndarray            # (M,)
    load: np.ndarray            # (M, 6)
    noise: np.ndarray           # (M,)
    scale: np.ndarray           # (M,) physical scale

    @property
    def feature_names(self) -> list[str]:
        return [f"{n}_mean" for n in self.names] + [f"{n}_std" for n in self.names]

    def index(self, kind: str) -> np.ndarray:
        return np.array([i for i, k in enumerate(self.kinds) if k == kind], dtype=np.int64)


def catalogue(spec: ClusterSpec) -> Catalogue:
    rng = np.random.default_rng([spec.seed, 0xCA7])
    kinds = list(_KINDS)
    weights = np.array([_KINDS[k][0] for k in kinds], dtype=np.float64)
    # Every kind at least once when there is room; the rest in proportion.
    M = spec.metrics
    counts = np.zeros(len(kinds), dtype=np.int64)
    if len(kinds) <= M:
        counts += 1
    rest = M - counts.sum()
    share = weights / weights.sum() * rest
    counts += np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - np.floor(share)))[: M - counts.sum()]:
        counts[i] += 1
    names, mk, base, load, noise, scale = [], [], [], [], [], []
    for kind, c in zip(kinds, counts, strict=True):
        _, b, ld, nz, sc, unit = _KINDS[kind]
        for i in range(c):
            names.append(f"{kind}{i}_{unit}")
            mk.append(kind)
            base.append(b + rng.normal(0, 0.02))
            load.append(np.asarray(ld) * rng.uniform(0.8, 1.2, size=len(FACTORS)))
            noise.append(nz * rng.uniform(0.7, 1.3))
            scale.append(sc)
    return Catalogue(names, mk, np.array(base), np.array(load).reshape(-1, len(FACTORS)),
                     np.array(noise), np.array(scale))


def _saturate(x: np.ndarray) -> np.ndarray:
    """Smooth clip to [0, ~1.1]: linear in the middle, saturating at the top."""
    return np.log1p(np.exp(8.0 * x)) / 8.0 - np.log1p(np.exp(8.0 * (x - 1.1))) / 8.0


def node_windows(spec: ClusterSpec, node: int, cat: Catalogue | None = None):
    """``(X, labels)`` for one node: X float32 (n, features) in physical units."""
    if not 0 <= node < spec.nodes:
        raise ValueError(f"node {node} outside 0..{spec.nodes - 1}")
    cat = cat or catalogue(spec)
    rng = np.random.default_rng([spec.seed, 0x0DE, node])
    scarce = spec.is_scarce(node)
    n = int(round(spec.windows * (spec.scarce_windows if scarce else 1.0)))
    n = max(n, 20)
    rate = spec.scarce_anomaly_rate if scarce else spec.anomaly_rate
    M, J = len(cat.names), len(_JOB_TYPES)

    # Per-node personality: job mix, gains and offsets.
    mix = rng.dirichlet(np.full(J, 0.6))
    gain = 1.0 + rng.normal(0, spec.node_spread, size=M)
    offset = rng.normal(0, spec.node_spread, size=M)
    job_jitter = rng.normal(0, 0.03, size=(J, len(FACTORS)))

    # Workload: a Markov chain of jobs, geometric durations (mean 8 windows).
    z = np.empty((n, len(FACTORS)))
    t = 0
    while t < n:
        j = rng.choice(J, p=mix)
        d = int(rng.geometric(1.0 / 8.0))
        z[t:t + d] = _JOB_TYPES[j] + job_jitter[j]
        t += d
    z += rng.normal(0, 0.04, size=z.shape)  # within-job wander
    z = np.clip(z, 0.0, 1.0)

    labels = np.zeros(n, dtype=np.int8)
    fault_mask = np.zeros((n, M))  # additive fault effect on the mean
    std_mult = np.ones((n, M))
    target = int(round(rate * n))
    placed = 0
    guard = 0
    while placed < target and guard < 10 * n:
        guard += 1
        length = int(rng.integers(1, 7))
        start = int(rng.integers(0, max(1, n - length)))
        sl = slice(start, start + length)
        if labels[sl].any():
            continue
        kind = int(rng.integers(len(FAULT_KINDS)))
        sev = rng.uniform(*spec.severity)
        _apply_fault(FAULT_KINDS[kind], sev, sl, length, z, fault_mask, std_mult, cat, rng)
        labels[sl] = kind + 1
        placed += length

    activity = z @ cat.load.T  # (n, M)
    mean = _saturate(gain * (cat.base + activity) + offset + fault_mask
                     + rng.normal(0, 1, size=(n, M)) * cat.noise)
    std = (0.02 + 0.15 * np.abs(activity) * gain) * std_mult
    std = np.abs(std + rng.normal(0, 1, size=(n, M)) * cat.noise * 0.5)
    X = np.concatenate([mean * cat.scale, std * cat.scale], axis=1).astype(np.float32)
    return X, labels


def _apply_fault(kind, sev, sl, length, z, fault, std_mult, cat, rng):
    ramp = np.linspace(0.3, 1.0, length)[:, None] * sev
    idx = cat.index
    if kind == "cpu_hog":
        z[sl, 0] = np.maximum(z[sl, 0], 0.6 + 0.4 * sev)
        f = fault[sl]  # a view: writes land in `fault`
        f[:, idx("procs")] += 0.6 * sev
        f[:, idx("power")] += 0.2 * sev
        s = std_mult[sl]
        s[:, idx("cpu_util")] *= 0.3  # flat-out cores barely vary
    elif kind == "mem_leak":
        f = fault[sl]
        f[:, idx("mem")] += 0.8 * ramp
        f[:, idx("swap")] += 0.9 * ramp
        f[:, idx("procs")] += 0.2 * ramp
    elif kind == "io_contention":
        z[sl, 2] = np.maximum(z[sl, 2], 0.7 + 0.3 * sev)
        f = fault[sl]
        f[:, idx("cpu_util")] -= 0.3 * sev   # cores wait on I/O
        f[:, idx("load")] += 0.5 * sev       # blocked processes count in the load
        s = std_mult[sl]
        s[:, idx("disk")] *= 1.0 + 3.0 * sev
    elif kind == "net_contention":
        z[sl, 3] = np.maximum(z[sl, 3], 0.7 + 0.3 * sev)
        f = fault[sl]
        f[:, idx("net_errs")] += 0.8 * sev
        f[:, idx("cpu_util")] -= 0.25 * sev  # MPI ranks stall
        s = std_mult[sl]
        s[:, idx("net")] *= 1.0 + 3.0 * sev
    elif kind == "thermal":
        fans = idx("fan")
        f = fault[sl]
        if rng.random() < 0.5 and len(fans):  # one fan stops
            dead = fans[rng.integers(len(fans))]
            f[:, dead] -= 2.0
        else:  # cooling failure: fans flat out
            f[:, fans] += 0.6 * sev
        f[:, idx("temp")] += 0.5 * sev
        f[:, idx("gpu_temp")] += 0.4 * sev
        f[:, idx("cpu_freq")] -= 0.4 * sev   # thermal throttling
    elif kind == "slow_node":
        f = fault[sl]
        f[:, idx("cpu_freq")] -= 0.5 * sev
        f[:, idx("power")] -= 0.3 * sev
        f[:, idx("load")] += 0.3 * sev
    else:  # pragma: no cover - FAULT_KINDS is closed
        raise ValueError(kind)
