"""Turning stored windows into models: local training and installing a federated model.

Theory of operation
-------------------
Plain synchronous functions (the daemon runs them in a worker thread):

* :func:`training_matrix` picks the features of the node *now* (those of the
  newest training window) and keeps the windows that have all of them, so a
  sensor that appeared or vanished months ago does not shrink the model to
  the features every window ever had.
* :func:`train_local` is the seed's per-node baseline: min-max scaler fitted
  on the node's own windows, the autoencoder trained on them, threshold =
  the n-th percentile of its training errors, exported to ONNX.
* :func:`model_from_global` is what a node does after a federated run (the
  seed: "each of them performs semi-supervised anomaly detection again"):
  the global weights, but the node's *own* scaler and its *own* threshold,
  both computed from its own training windows.
* :func:`export_onnx` writes a model file atomically (the bytes are
  ``shoal.core.telemetry.model.onnx_bytes``).
* :func:`feature_row` lays a window out in a model's feature order; a
  missing feature becomes NaN, which the detector's scaler maps to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.core.telemetry.model import (
    SCALE_MARGIN,
    Autoencoder,
    MinMaxScaler,
    ModelError,
    fit_detector,
    onnx_bytes,
    threshold_from_errors,
)
from shoal.daemons.runtime.state import atomic_write
from shoal.daemons.telemetry.store import StoredWindow


@dataclass(frozen=True)
class TrainResult:
    windows: int
    features: int
    threshold: float
    loss: float | None


def export_onnx(ae: Autoencoder, scaler: MinMaxScaler, feature_names: Sequence[str],
                threshold: float, path: str | Path, *, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the model atomically to ``path`` (temp file, fsync, rename)."""
    data = onnx_bytes(ae, scaler, feature_names, threshold, extra_metadata=extra_metadata)
    atomic_write(Path(path), data, mode=0o644)


def training_matrix(windows: list[StoredWindow], features: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    if not windows:
        return np.zeros((0, 0), np.float32), []
    names = sorted(windows[-1].features) if features is None else list(features)
    rows = [[w.features[n] for n in names] for w in windows if all(n in w.features for n in names)]
    X = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names))
    return X, names


def selected_features(windows: list[StoredWindow], prefixes: Sequence[str],
                      exclude: Sequence[str] = ()) -> list[str] | None:
    """The node's current features whose names start with one of ``prefixes`` (any, without
    prefixes) and with none of ``exclude``; None (all) when neither is given.

    ``[training] features`` and ``exclude_features``: the same choice for a local model and
    for the training data a federated round reads, so both learn the same signals.
    """
    if not (prefixes or exclude) or not windows:
        return None
    features = sorted(n for n in windows[-1].features
                      if (not prefixes or n.startswith(tuple(prefixes))) and not n.startswith(tuple(exclude)))
    if not features:
        but = f" and not with {', '.join(exclude)} (exclude_features)" if exclude else ""
        raise ModelError(f"no feature of this node starts with {', '.join(prefixes) or 'anything'}{but} "
                         "([training] features)")
    return features


def train_local(windows: list[StoredWindow], out: Path, *, epochs: int, batch_size: int, lr: float,
                percentile: float, min_windows: int, min_steps: int = 0, folds: int = 0, seed: int = 0,
                prefixes: Sequence[str] = (), exclude: Sequence[str] = (), scale_margin: float = SCALE_MARGIN,
                threshold_factor: float = 1.0) -> TrainResult:
    """``prefixes``: only the features whose names start with one of them (none: every feature);
    ``exclude``: not those starting with one of these.

    ``min_steps``, ``folds``, ``scale_margin`` and ``threshold_factor``: the live recipe
    (:func:`shoal.core.telemetry.model.fit_detector`).
    """
    X, names = training_matrix(windows, selected_features(windows, prefixes, exclude))
    if X.shape[0] < max(min_windows, folds):
        raise ModelError(f"only {X.shape[0]} training windows with the node's current features; "
                         f"at least {max(min_windows, folds)} are needed")
    fit = fit_detector(X, epochs=epochs, batch_size=batch_size, lr=lr, percentile=percentile,
                       min_steps=min_steps, folds=folds, seed=seed, scale_margin=scale_margin,
                       threshold_factor=threshold_factor)
    export_onnx(fit.ae, fit.scaler, names, fit.threshold, out, extra_metadata={"shoal.origin": "local"})
    return TrainResult(X.shape[0], len(names), fit.threshold, fit.losses[-1])


def model_from_global(weights: list[np.ndarray], features: list[str], windows: list[StoredWindow], out: Path,
                      *, percentile: float, run_id: int, scale_margin: float = SCALE_MARGIN,
                      threshold_factor: float = 1.0) -> TrainResult:
    X, names = training_matrix(windows, features)
    if X.shape[0] == 0:
        raise ModelError(f"none of this node's training windows has all {len(features)} federated features")
    ae = Autoencoder.from_weights(weights)  # ModelError on bad shapes / NaN
    if ae.n_features != len(names):
        raise ModelError(f"federated model takes {ae.n_features} features but names {len(names)}")
    scaler = MinMaxScaler(margin=scale_margin).fit(X)
    threshold = threshold_from_errors(ae.reconstruction_error(scaler.transform(X)), percentile, threshold_factor)
    export_onnx(ae, scaler, names, threshold, out,
                extra_metadata={"shoal.origin": "federated", "shoal.run_id": str(run_id)})
    return TrainResult(X.shape[0], len(names), threshold, None)


def feature_row(features: dict[str, float], names: list[str]) -> tuple[np.ndarray, int]:
    """-> (1 x F row in ``names`` order with NaN for missing, number missing)."""
    row = np.array([features.get(n, np.nan) for n in names], dtype=np.float32).reshape(1, -1)
    return row, int(np.isnan(row).sum())
