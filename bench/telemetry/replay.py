"""Replay a live run (bench/telemetry/live.py) with another training recipe, without injecting again.

A live run keeps every window the daemon stored, with its features and labels
(``live-windows.json.gz``), and per scored window Netdata's anomaly rate (``live.json``).
This trains a model on the run's normal period exactly as ``shoal telemetry train`` does
(the same windows: labelled normal or not labelled, closed before training began; the
same ``train_local``), with the daemon's ``[training]`` settings and the overrides given
here in TOML, then scores the run's windows with it through onnxruntime and evaluates
them as live.py does, Netdata at the replay's false-positive rate included::

    .venv/bin/python bench/telemetry/replay.py --set 'threshold_factor = 2.0'
    .venv/bin/python bench/telemetry/replay.py --set 'exclude_features = ["load_", "mem_"]'

``--deviations K`` tries a candidate feature the collector does not have: per metric, the
window's mean less the median of that mean over the K windows before it (``<metric>:dev``;
a level that moves and stays returns to zero after K/2 windows), added to every kept window.

Only the recipe changes: the windows are those the live run's collector closed. The
verdict differs from the daemon's only by ``[detector] confirm`` (the replay scores each
window alone, as live.py does).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live import HERE, Injection, classify, evaluate, print_table, threshold_at, windows_file  # noqa: E402

from shoal.core.telemetry.model import Detector  # noqa: E402
from shoal.daemons.runtime.config import parse_config  # noqa: E402
from shoal.daemons.telemetry.config import TelemetryConfig  # noqa: E402
from shoal.daemons.telemetry.store import NORMAL, StoredWindow  # noqa: E402
from shoal.daemons.telemetry.trainer import feature_row, train_local  # noqa: E402


def stored(w: dict) -> StoredWindow:
    return StoredWindow(w["start"], w["end"], w["n_samples"], w["features"], w["label"], None, None, None)


def with_deviations(windows: list[dict], k: int, min_past: int = 6) -> list[dict]:
    """The kept windows, in time order, each with ``<metric>:dev`` = its ``<metric>:mean`` less
    the median of that mean over the ``k`` windows before it (once ``min(k, min_past)`` had it)."""
    out = []
    for i, w in enumerate(windows):
        past = windows[max(0, i - k):i]
        features = dict(w["features"])
        for n, v in w["features"].items():
            if n.endswith(":mean"):
                before = [p["features"][n] for p in past if n in p["features"]]
                if len(before) >= min(k, min_past):
                    features[n[:-5] + ":dev"] = v - median(before)
        out.append({**w, "features": features})
    return out


def replay(run: dict, kept: dict, training_toml: str, deviations: int = 0) -> dict:
    cfg = parse_config("[training]\n" + training_toml, TelemetryConfig, source="--set")
    t = cfg.training
    kept_windows = with_deviations(kept["windows"], deviations) if deviations else kept["windows"]
    windows = [stored(w) for w in kept_windows]
    train = [w for w in windows if w.end <= kept["train_start"] and w.label in (None, NORMAL)][-t.max_windows:]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        res = train_local(train, model, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                          percentile=t.percentile, min_windows=t.min_windows, min_steps=t.min_steps,
                          folds=t.folds, prefixes=t.features, exclude=t.exclude_features,
                          scale_margin=t.scale_margin, threshold_factor=t.threshold_factor)
        det = Detector.load(model)
    by_start = {w.start: w for w in windows}
    scored = run["windows"]
    missing = [w["start"] for w in scored if w["start"] not in by_start]
    if missing:
        raise SystemExit(f"{len(missing)} scored windows of live.json are not in the kept windows")
    X = np.vstack([feature_row(by_start[w["start"]].features, det.feature_names)[0] for w in scored])
    scores = det.score(X)
    flags = list(det.is_anomalous(scores))
    injections = [Injection(**i) for i in run["injections"]]
    sc = classify([(w["start"], w["end"]) for w in scored], injections)
    if [s for s, _ in sc.windows] != [w["start"] for w in scored]:
        raise SystemExit("live.json's scored windows do not classify the same way again")
    normal = np.array([t is None for t in sc.truth])
    results = {"shoal": evaluate(flags, sc, injections)}
    thr = threshold_at(scores, normal, 0.02)
    results["shoal_at_2pct"] = {**evaluate(list(scores > thr), sc, injections), "threshold_score": thr}
    rates = np.array([w["netdata_rate"] for w in scored])
    for name, target in (("netdata_at_shoal_fpr", results["shoal"]["fpr"] or 0.0), ("netdata_at_2pct", 0.02)):
        thr = threshold_at(rates, normal, target)
        results[name] = {**evaluate(list(rates > thr), sc, injections), "threshold_rate": thr}
    return {"training": training_toml, "deviations": deviations, "trained_windows": res.windows,
            "features": res.features, "threshold": res.threshold, "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(HERE / "live.json"), help="a live.py result")
    ap.add_argument("--set", action="append", default=[], metavar="TOML",
                    help="a [training] setting, e.g. 'threshold_factor = 2.0' (repeatable)")
    ap.add_argument("--deviations", type=int, default=0, metavar="K",
                    help="add <metric>:dev (the mean less its median over the K windows before) to every window")
    ap.add_argument("--out", default=None, help="write the replay's results here (JSON)")
    args = ap.parse_args()
    run = json.loads(Path(args.run).read_text())
    with gzip.open(windows_file(Path(args.run)), "rt") as f:
        kept = json.load(f)
    out = replay(run, kept, "\n".join(args.set), args.deviations)
    print(f"trained on {out['trained_windows']} windows, {out['features']} features, "
          f"threshold {out['threshold']:.4g}")
    print_table(out["results"])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
