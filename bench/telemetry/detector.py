"""Detector latency at batch 1 and throughput at batch 1024, plus numpy training speed.

    .venv/bin/python bench/telemetry/detector.py [--features 460] [--repeat 5]

Builds the seed-sized autoencoder (460-80-60-40-20-40-60-80-460), exports it with
``export_onnx``, loads it with ``Detector.load`` (onnxruntime, one intra-op thread,
as the daemon runs it) and times ``Detector.score`` on raw rows, scaling included.
Prints a table and writes detector.json next to this script. Numbers are the median
of ``--repeat`` runs; the machine is shared, so read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shoal.core.telemetry.model import (
    Autoencoder,
    Detector,
    MinMaxScaler,
    single_blas_thread,
    threshold_from_errors,
)
from shoal.daemons.telemetry.trainer import export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=460)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    F = args.features
    rng = np.random.default_rng(0)
    raw = rng.normal(100, 20, size=(8192, F)).astype(np.float32)
    scaler = MinMaxScaler().fit(raw)
    ae = Autoencoder(F)
    results = {"features": F, "params": ae.n_params, "python": platform.python_version()}

    with single_blas_thread():
        train = scaler.transform(raw)
        for batch in (32, 256):
            runs = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                ae.fit(train[:4096], epochs=1, batch_size=batch, lr=1e-3)
                runs.append(4096 / (time.perf_counter() - t))
            results[f"train_samples_per_s_batch{batch}"] = statistics.median(runs)
        thr = threshold_from_errors(ae.reconstruction_error(train))

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        export_onnx(ae, scaler, [f"f{i}" for i in range(F)], thr, path)
        results["model_bytes"] = path.stat().st_size
        t = time.perf_counter()
        det = Detector.load(path)
        results["load_seconds"] = time.perf_counter() - t

    # Batch 1: one closed window, as the daemon scores it.
    n1 = 5000
    lat = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        for i in range(n1):
            det.score(raw[i:i + 1])
        lat.append((time.perf_counter() - t) / n1)
    results["batch1_latency_us"] = statistics.median(lat) * 1e6
    # Batch 1024: rescoring history after a model install.
    tp = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        for start in range(0, 8192, 1024):
            det.score(raw[start:start + 1024])
        tp.append(8192 / (time.perf_counter() - t))
    results["batch1024_samples_per_s"] = statistics.median(tp)

    rows = [
        ("detector latency, batch 1 (us/window)", f"{results['batch1_latency_us']:.1f}"),
        ("detector throughput, batch 1024 (windows/s)", f"{results['batch1024_samples_per_s']:,.0f}"),
        ("model load + validation (ms)", f"{results['load_seconds'] * 1e3:.1f}"),
        ("model file (bytes)", f"{results['model_bytes']:,}"),
        ("numpy training, batch 32 (samples/s)", f"{results['train_samples_per_s_batch32']:,.0f}"),
        ("numpy training, batch 256 (samples/s)", f"{results['train_samples_per_s_batch256']:,.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"autoencoder {F}-80-60-40-20-40-60-80-{F}, {ae.n_params:,} parameters")
    for name, value in rows:
        print(f"{name.ljust(w)}  {value:>12}")
    out = Path(__file__).with_name("detector.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
