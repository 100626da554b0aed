"""``shoal telemetry experiment``: the seed's per-node vs federated comparison.

Theory of operation
-------------------
The protocol is the seed's (Farooq & Borghesi 2023, section IV), run on the
synthetic cluster of ``synthetic.py``:

1. For every node, a random 80/20 split of its windows; anomalous windows are then
   moved from the training part to the test part, so training is semi-supervised
   (normal windows only). The test set is fixed for the whole experiment.
2. For each training fraction r (1, 1/2, 1/4, 1/6, 1/8, 1/16 by default) a node
   keeps a random r-th of its normal training windows.
3. Each node fits its own min-max scaler on its own training windows (no raw data
   leaves a node, the scaler neither).
4. **Per-node AE** (the baseline): an autoencoder trained ``epochs`` epochs on the
   node's own windows.
   **FedAvg**: one global autoencoder, ``rounds`` rounds; in each round every node
   starts from the global weights, trains ``local_epochs`` epochs on its own windows
   and returns weights and its number of windows; the new global model is the
   sample-weighted mean (Eq. 1 of the seed), computed by Flower's own
   ``flwr.server.strategy.aggregate.aggregate``. The clients run in-process, one
   after the other, with no Ray and no SuperLink; the daemons do the same over the
   network.
5. Either way, each node picks its threshold as the 98th percentile of its model's
   errors on its own training windows, flags test windows above it, and counts
   precision, recall, F1, TNR and FPR. Tables report mean +/- std over nodes, like
   the seed's Tables II and III; the figure is the seed's Fig. 2, a histogram of the
   per-node F1 improvement of FedAvg over the per-node model at full data.

Every model starts from the same initial weights (seeded), so the two methods differ
only in what they learn from. Training hyperparameters are not the seed's: with its
learning rate of 1e-6 and batch 10, numpy needs hours for 70 nodes; the defaults here
(lr 1e-3, batch 64, 5 epochs per-node, 5 rounds of 1 local epoch for FedAvg) give every
node the same amount of local training with either method, and finish in minutes.

Training budget with less data. With ``budget="work"`` (the default) a model trained
on a fraction r of the data runs ``epochs / r`` epochs (per-node) or ``rounds / r``
rounds (FedAvg): every node does the same number of optimizer steps in every cell of
the table, so the table measures what *data* buys, not what compute buys.
``budget="epochs"`` keeps epochs and rounds fixed, as the seed describes, so smaller
fractions also mean proportionally less training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from shoal.core.telemetry.model import Autoencoder, MinMaxScaler, single_blas_thread, threshold_from_errors
from shoal.lab.synthetic_cluster import ClusterSpec, catalogue, node_windows

METRICS = ("precision", "recall", "f1", "tnr", "fpr")
DEFAULT_FRACTIONS = ("1", "1/2", "1/4", "1/6", "1/8", "1/16")


@dataclass
class ExperimentConfig:
    nodes: int = 70
    features: int = 460
    windows: int = 13_000
    epochs: int = 5             # per-node model, at full data
    rounds: int = 5             # FedAvg rounds, at full data
    local_epochs: int = 1       # per round, per node
    budget: str = "work"        # "work": epochs and rounds scale with 1/fraction; "epochs": fixed
    batch_size: int = 64
    lr: float = 1e-3
    percentile: float = 98.0
    test_share: float = 0.2
    fractions: tuple[str, ...] = DEFAULT_FRACTIONS
    seed: int = 0
    hidden: tuple[int, ...] = (80, 60, 40, 20, 40, 60, 80)
    spec_overrides: dict = field(default_factory=dict)

    def spec(self) -> ClusterSpec:
        return ClusterSpec(nodes=self.nodes, features=self.features, windows=self.windows,
                           seed=self.seed, **self.spec_overrides)


# ------------------------------------------------------------------ protocol pieces


def split_node(X: np.ndarray, y: np.ndarray, rng: np.random.Generator, test_share: float = 0.2):
    """The seed's split: random 80/20, then anomalies move from train to test.

    Returns ``(train_normal_X, test_X, test_y)`` with test_y boolean (True = anomaly).
    """
    n = X.shape[0]
    order = rng.permutation(n)
    n_test = int(round(test_share * n))
    test_idx, train_idx = order[:n_test], order[n_test:]
    anom_train = train_idx[y[train_idx] != 0]
    train_idx = train_idx[y[train_idx] == 0]
    test_idx = np.concatenate([test_idx, anom_train])
    return X[train_idx], X[test_idx], y[test_idx] != 0


def subsample(n: int, fraction: Fraction, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random ``fraction`` of ``n`` rows (at least one)."""
    k = max(1, math.ceil(n * fraction))
    return np.sort(rng.permutation(n)[:k])


def confusion(y_true, y_pred) -> dict[str, float]:
    """Precision, recall, F1, TNR and FPR as the seed defines them.

    A ratio with a zero denominator is reported as 0 (e.g. precision when nothing
    was flagged), so a silent model is not rewarded.
    """
    y_true = np.asarray(y_true, bool)
    y_pred = np.asarray(y_pred, bool)
    tp = int(np.sum(y_true & y_pred))
    fp = int(np.sum(~y_true & y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    fn = int(np.sum(y_true & ~y_pred))

    def ratio(a, b):
        return a / b if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "tnr": ratio(tn, tn + fp),
        "fpr": ratio(fp, tn + fp),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def fedavg(results: Sequence[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Sample-weighted mean of client weights (seed Eq. 1), via Flower's aggregate."""
    from flwr.server.strategy.aggregate import aggregate

    if not results:
        raise ValueError("FedAvg needs at least one client result")
    return [np.asarray(w, np.float32) for w in aggregate([(list(w), int(n)) for w, n in results])]


def evaluate(ae: Autoencoder, train_scaled: np.ndarray, test_scaled: np.ndarray,
             test_y: np.ndarray, percentile: float) -> dict[str, float]:
    threshold = threshold_from_errors(ae.reconstruction_error(train_scaled), percentile)
    scores = ae.reconstruction_error(test_scaled)
    out = confusion(test_y, scores > threshold)
    out["threshold"] = threshold
    return out


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {"mean": float(np.mean([r[m] for r in rows])),
                "std": float(np.std([r[m] for r in rows]))} for m in METRICS}


# ---------------------------------------------------------------------- the runner


@dataclass
class _Node:
    index: int
    scarce: bool
    train: np.ndarray      # raw normal training windows
    test: np.ndarray       # raw test windows
    test_y: np.ndarray


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole protocol; returns the JSON-ready result document."""
    # One BLAS thread: the matrices are small, and a second thread spinning on a
    # shared core made training up to 30x slower in measurements here.
    with single_blas_thread():
        return _run_experiment(cfg, log)


def _run_experiment(cfg: ExperimentConfig, log: Callable[[str], None]) -> dict:
    if cfg.budget not in ("work", "epochs"):
        raise ValueError(f"budget must be 'work' or 'epochs', got {cfg.budget!r}")
    fractions = [parse_fraction(f) for f in cfg.fractions]
    spec = cfg.spec()
    t0 = time.perf_counter()
    cat = catalogue(spec)
    nodes: list[_Node] = []
    for k in range(spec.nodes):
        X, y = node_windows(spec, k, cat)
        rng = np.random.default_rng([cfg.seed, 0x5B1, k])
        tr, te, te_y = split_node(X, y, rng, cfg.test_share)
        nodes.append(_Node(k, spec.is_scarce(k), tr, te, te_y))
    t_gen = time.perf_counter() - t0
    log(f"generated {spec.nodes} nodes x {spec.features} features in {t_gen:.1f} s "
        f"(mean {np.mean([n.train.shape[0] + n.test.shape[0] for n in nodes]):.0f} windows/node)")

    init = Autoencoder(spec.features, hidden=cfg.hidden, seed=cfg.seed).get_weights()
    doc = {"config": _config_doc(cfg), "features": cat.feature_names[:8] + ["..."],
           "generate_seconds": t_gen, "results": []}
    for frac in fractions:
        t1 = time.perf_counter()
        # Per node: its training subset, scaled with its own scaler.
        data = []
        for node in nodes:
            rng = np.random.default_rng([cfg.seed, 0xF4A, node.index, frac.numerator,
                                         frac.denominator])
            train = node.train[subsample(node.train.shape[0], frac, rng)]
            scaler = MinMaxScaler().fit(train)
            data.append((scaler.transform(train), scaler.transform(node.test)))

        scale = 1 if cfg.budget == "epochs" else 1 / frac
        epochs = max(1, round(cfg.epochs * scale))
        rounds = max(1, round(cfg.rounds * scale))
        per_node = []
        for node, (train, test) in zip(nodes, data, strict=True):
            ae = _model(cfg, init, node.index)
            ae.fit(train, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr)
            per_node.append(evaluate(ae, train, test, node.test_y, cfg.percentile))
        t_ae = time.perf_counter() - t1

        t2 = time.perf_counter()
        global_w = [w.copy() for w in init]
        client = _model(cfg, init, 0)
        round_losses = []
        for r in range(rounds):
            results, losses = [], []
            for node, (train, _) in zip(nodes, data, strict=True):
                client.set_weights(global_w)
                client.rng = np.random.default_rng([cfg.seed, 0xC11, node.index, r])
                losses.append(client.fit(train, epochs=cfg.local_epochs,
                                         batch_size=cfg.batch_size, lr=cfg.lr)[-1])
                results.append((client.get_weights(), train.shape[0]))
            global_w = fedavg(results)
            round_losses.append(float(np.average(losses, weights=[n for _, n in results])))
        client.set_weights(global_w)
        federated = [evaluate(client, train, test, node.test_y, cfg.percentile)
                     for node, (train, test) in zip(nodes, data, strict=True)]
        t_fl = time.perf_counter() - t2

        entry: dict[str, Any] = {
            "fraction": _frac_text(frac),
            "ae": summarise(per_node),
            "fl": summarise(federated),
            "epochs": epochs,
            "rounds": rounds,
            "fl_round_losses": round_losses,
            "seconds": {"per_node": t_ae, "fedavg": t_fl},
            "per_node": [
                {"node": n.index, "scarce": n.scarce, "train": d[0].shape[0],
                 "test": int(n.test_y.size), "anomalies": int(n.test_y.sum()),
                 "ae": _short(a), "fl": _short(f)}
                for n, d, a, f in zip(nodes, data, per_node, federated, strict=True)
            ],
        }
        doc["results"].append(entry)
        log(f"fraction {entry['fraction']:>4}: F1 per-node {entry['ae']['f1']['mean']:.2f} "
            f"FedAvg {entry['fl']['f1']['mean']:.2f} ({t_ae:.0f} s + {t_fl:.0f} s)")
    doc["total_seconds"] = time.perf_counter() - t0
    doc["targets"] = targets(doc)
    return doc


def _model(cfg: ExperimentConfig, init: list[np.ndarray], node: int) -> Autoencoder:
    ae = Autoencoder(cfg.features, hidden=cfg.hidden, seed=cfg.seed * 1000 + node)
    ae.set_weights(init)
    return ae


def _short(m: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def targets(doc: dict) -> dict:
    """The issue's targets, checked against the result document."""
    by = {r["fraction"]: r for r in doc["results"]}
    out = {}
    if "1" in by:
        fl, ae = by["1"]["fl"]["f1"]["mean"], by["1"]["ae"]["f1"]["mean"]
        out["fedavg_f1_at_least_0.84"] = {"value": fl, "met": fl >= 0.84}
        out["fedavg_f1_above_per_node"] = {"value": fl - ae, "met": fl > ae}
        smallest = min(by, key=lambda f: float(Fraction(f)))
        if smallest != "1":
            small = by[smallest]["fl"]["f1"]["mean"]
            out[f"fedavg_{smallest}_at_least_per_node_full"] = {
                "value": small - ae, "met": small >= ae}
    return out


def parse_fraction(text) -> Fraction:
    try:
        f = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"bad training fraction {text!r} (use e.g. 1, 1/2, 0.25)") from None
    if not 0 < f <= 1:
        raise ValueError(f"training fraction {text!r} must be in (0, 1]")
    return f


def _frac_text(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _config_doc(cfg: ExperimentConfig) -> dict:
    d = asdict(cfg)
    d["fractions"] = list(cfg.fractions)
    d["hidden"] = list(cfg.hidden)
    return d


# ------------------------------------------------------------------------ outputs


_COLUMNS = [(m, meth) for m in METRICS for meth in ("ae", "fl")]
_HEAD = {"precision": "Prec.", "recall": "Recall", "f1": "F1", "tnr": "TNR", "fpr": "FPR"}


def format_table(doc: dict) -> str:
    """Tables II/III: one row per fraction, mean +/- std over nodes for both methods."""
    heads = ["data"] + [f"{_HEAD[m]}-{'AE' if meth == 'ae' else 'FL'}" for m, meth in _COLUMNS]
    rows = [heads]
    for r in doc["results"]:
        rows.append([r["fraction"]] + [
            f"{r[meth][m]['mean']:.2f}+/-{r[meth][m]['std']:.2f}" for m, meth in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(heads))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


#: Fig. 2's bins: 20 over [-1, 1] (an F1 difference cannot leave it)
IMPROVEMENT_EDGES = np.linspace(-1.0, 1.0, 21)


def improvement_histogram(doc: dict, fraction: str = "1") -> tuple[dict, np.ndarray, np.ndarray]:
    """Fig. 2's data: (the result entry, bin edges, nodes per bin) of the per-node F1
    improvement (FedAvg - per-node) at training fraction ``fraction`` (else the first)."""
    entry = next((r for r in doc["results"] if r["fraction"] == fraction), doc["results"][0])
    diffs = np.array([p["fl"]["f1"] - p["ae"]["f1"] for p in entry["per_node"]])
    counts, _ = np.histogram(np.clip(diffs, -1.0, 1.0), bins=IMPROVEMENT_EDGES)
    return entry, IMPROVEMENT_EDGES, counts


def improvement_figure(doc: dict, fraction: str = "1"):
    """Fig. 2 as a matplotlib figure (Agg backend: no display needed). Each bar's
    artist id (the SVG group id) is ``f1-bin-<i>``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entry, edges, counts = improvement_histogram(doc, fraction)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    bars = ax.bar(edges[:-1], counts, width=np.diff(edges) * 0.92, align="edge", color="#4878a8")
    for i, bar in enumerate(bars):
        bar.set_gid(f"f1-bin-{i}")
    ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], padding=2)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xticks(np.linspace(-1.0, 1.0, 11))
    ax.set_ylim(0, max(1, int(counts.max())) * 1.12)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("F1(FedAvg) - F1(per-node AE)")
    ax.set_ylabel("nodes")
    ax.set_title(f"Per-node F1 improvement after FedAvg (training data {entry['fraction']}, "
                 f"{int(counts.sum())} nodes)", fontsize=11)
    fig.tight_layout()
    return fig


def write_figure(doc: dict, out: Path, stem: str = "f1_improvement") -> tuple[Path, Path]:
    """Fig. 2 as ``<stem>.png`` and ``<stem>.svg`` in ``out`` (pages embed the SVG)."""
    import io

    from shoal.daemons.runtime.state import atomic_write

    fig = improvement_figure(doc)
    paths = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        # No date in the SVG's metadata: a rerun with the same results gives the same file.
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        path = out / f"{stem}.{fmt}"
        atomic_write(path, buf.getvalue(), mode=0o644)
        paths.append(path)
    return paths[0], paths[1]


def write_outputs(doc: dict, out: Path) -> tuple[Path, Path, Path]:
    """experiment.json, and Fig. 2 as f1_improvement.png and .svg."""
    from shoal.daemons.runtime.state import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    j = out / "experiment.json"
    atomic_write(j, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o644)
    png, svg = write_figure(doc, out)
    return j, png, svg


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ExperimentConfig()
    a = parser.add_argument
    a("--nodes", type=int, default=d.nodes, help=f"cluster size K (default {d.nodes})")
    a("--features", type=int, default=d.features,
      help=f"features per window, even (default {d.features})")
    a("--windows", type=int, default=d.windows,
      help=f"windows per ordinary node (default {d.windows})")
    a("--epochs", type=int, default=d.epochs, help=f"per-node training epochs ({d.epochs})")
    a("--rounds", type=int, default=d.rounds, help=f"FedAvg rounds ({d.rounds})")
    a("--local-epochs", type=int, default=d.local_epochs,
      help=f"local epochs per FedAvg round ({d.local_epochs})")
    a("--budget", choices=("work", "epochs"), default=d.budget,
      help="work: epochs/rounds scale with 1/fraction (same steps everywhere); "
           "epochs: fixed, as in the seed (default work)")
    a("--batch-size", type=int, default=d.batch_size, help=f"batch size ({d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"RMSProp learning rate ({d.lr})")
    a("--percentile", type=float, default=d.percentile,
      help=f"threshold percentile of training errors ({d.percentile})")
    a("--fractions", default=",".join(d.fractions),
      help="comma-separated training fractions (default 1,1/2,1/4,1/6,1/8,1/16)")
    a("--seed", type=int, default=d.seed, help="random seed (default 0)")
    a("--out", type=Path, default=Path("."),
      help="directory for experiment.json and f1_improvement.png/.svg (default .)")
    a("--quiet", action="store_true", help="print only the table")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    fractions = tuple(f.strip() for f in str(args.fractions).split(",") if f.strip())
    if not fractions:
        raise ValueError("--fractions is empty")
    for f in fractions:
        parse_fraction(f)
    for name in ("nodes", "windows", "epochs", "rounds", "local_epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.features < 2 or args.features % 2:
        raise ValueError("--features must be an even number >= 2")
    if args.windows < 20:
        raise ValueError("--windows must be >= 20")
    if not args.lr > 0:
        raise ValueError("--lr must be > 0")
    if not 0 <= args.percentile <= 100:
        raise ValueError("--percentile must be in [0, 100]")
    return ExperimentConfig(nodes=args.nodes, features=args.features, windows=args.windows,
                            epochs=args.epochs, rounds=args.rounds,
                            local_epochs=args.local_epochs, batch_size=args.batch_size,
                            budget=args.budget,
                            lr=args.lr, percentile=args.percentile, fractions=fractions,
                            seed=args.seed)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point for ``shoal telemetry experiment``; 0 on success, 2 on bad options."""
    out = out or sys.stdout
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"shoal telemetry experiment: {e}", file=sys.stderr)
        return 2
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=out, flush=True))
    doc = run_experiment(cfg, log)
    print(format_table(doc), file=out)
    for name, t in doc["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'MISSED'} ({t['value']:+.3f})", file=out)
    j, png, svg = write_outputs(doc, Path(args.out))
    print(f"wrote {j}, {png} and {svg}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.lab.telemetry_experiment",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
