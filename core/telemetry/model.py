"""The anomaly model: a dense autoencoder in numpy, its ONNX file, and the detector.

Theory of operation
-------------------
This follows the semi-supervised method of the seed (Farooq & Borghesi, ICTAI 2023,
after Borghesi et al. 2019). An autoencoder is trained only on windows that are
normal (labelled or assumed so). It learns to reconstruct healthy behaviour; at test
time a window it reconstructs badly is declared anomalous.

* Features are min-max scaled to [0, 1] with the minimum and maximum of the training
  windows (``MinMaxScaler``). Values outside the training range are kept, up to one
  training span beyond it (scaled values are clipped to [-1, 2]): a CPU hog that drives
  a feature past anything seen in training must raise the score, which clipping to
  [0, 1] would hide (the hog would look exactly like the busiest training window), and
  the bound keeps a single wild sensor from dominating the score without limit. How far
  is the model's ``shoal.scale_margin`` (``[training] scale_margin``, 1 span by default).
* The network is input -> 80 -> 60 -> 40 -> 20 -> 40 -> 60 -> 80 -> input, ReLU on
  every hidden layer and a sigmoid on the output (the targets live in [0, 1]).
  Weights are Glorot-uniform, biases zero (Keras' defaults, which the seed used).
  The loss is the root mean squared error of a batch, minimised with RMSProp
  (rho 0.9, eps 1e-7, as Keras). The seed's hyperparameters (10 epochs, batch 10,
  learning rate 1e-6) are the defaults of ``Autoencoder.fit``; callers that need a
  model in seconds rather than hours pass their own (the experiment does, and says so).
* The score of a window is its reconstruction error: the **mean over the features of
  the squared error** between the scaled window and its reconstruction (the seed:
  "the mean error over all features"). The threshold is the n-th percentile of the
  training windows' scores (98 by default); a score strictly above it is an anomaly.
* Weights are exchanged as a list of arrays ``[W0, b0, W1, b1, ...]`` with each
  ``W`` shaped ``(fan_in, fan_out)`` -- the order and shapes of Keras' ``get_weights``
  -- so FedAvg (Flower's ``aggregate``) averages them array by array.

The ONNX contract (format version 1)
------------------------------------
The ONNX graph is **only the autoencoder**: one float input ``[N, F]`` holding
*scaled* features and (first) output ``[N, F]`` holding the reconstruction. Scaling
and scoring happen outside the graph, in ``Detector``, from metadata carried in
``ModelProto.metadata_props``:

``shoal.format_version``  "1"
``shoal.feature_names``   JSON list of F unique strings, the column order of the input
``shoal.scaler_min``      JSON list of F finite numbers
``shoal.scaler_max``      JSON list of F finite numbers, each >= its minimum
``shoal.threshold``       a finite number >= 0 (score above it = anomalous)
``shoal.scale_margin``    optional: how many training spans past the range a scaled value
                          may go (clipped to [-m, 1 + m]); a finite number in [0, 1000],
                          1 when absent

Keeping the graph free of scaling means an autoencoder exported from any framework
(Keras via tf2onnx, PyTorch, hand-built with ``onnx.helper``) works once these keys
are added, and a new threshold is a metadata edit, not a graph edit. Files are
written with IR version 8 and opset 17, which onnxruntime 1.18+ loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = "1"
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # onnx 1.23 writes 14 by default; onnxruntime loads at most 13

# The seed's architecture and training hyperparameters (section IV.B).
SEED_HIDDEN = (80, 60, 40, 20, 40, 60, 80)
SEED_EPOCHS = 10
SEED_BATCH_SIZE = 10
SEED_LR = 1e-6
SEED_PERCENTILE = 98.0

META_KEYS = (
    "shoal.format_version",
    "shoal.feature_names",
    "shoal.scaler_min",
    "shoal.scaler_max",
    "shoal.threshold",
)

# Bounds on what a model file may declare, so a hostile or broken file cannot make
# the detector allocate without limit. 100k features is ~200x the seed's 460.
MAX_FEATURES = 100_000
MAX_MODEL_BYTES = 512 * 1024 * 1024


def single_blas_thread():
    """Context manager: numpy's BLAS on one thread while training or scoring.

    The matrices here are small (batch x 460 by 460 x 80); on shared cores a second
    BLAS thread spinning for work slowed training by up to 30x in measurements.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class ModelError(ValueError):
    """A model file is corrupt, incomplete or does not match; the message is one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- scaler


#: how far past the training range (in training spans) a scaled value may go, by default
SCALE_MARGIN = 1.0
#: ... and at most (a model's shoal.scale_margin)
MAX_SCALE_MARGIN = 1000.0


@dataclass
class MinMaxScaler:
    """Per-feature min-max scaling to [0, 1] over the training range, clipped to [-1, 2].

    A constant feature (max == min) maps to 0, as scikit-learn's MinMaxScaler does.
    ``margin``: the clip, in training spans past the range ([-margin, 1 + margin]).
    """

    lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    margin: float = SCALE_MARGIN

    def __post_init__(self) -> None:
        self.margin = check_scale_margin(self.margin)

    def fit(self, X) -> MinMaxScaler:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise ValueError(f"scaler needs a non-empty 2-D array, got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("scaler input contains NaN or infinity")
        self.lo = X.min(axis=0).astype(np.float32)
        self.hi = X.max(axis=0).astype(np.float32)
        return self

    @property
    def n_features(self) -> int:
        return int(self.lo.shape[0])

    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {X.shape[1]}")
        return _scale(X, self.lo, _inverse_span(self.lo, self.hi), self.margin)


def _inverse_span(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """1 / (max - min) per feature, 0 for a constant feature."""
    span = (hi - lo).astype(np.float32)
    inv = np.zeros_like(span)
    np.divide(np.float32(1.0), span, out=inv, where=span > 0)
    return inv


def check_scale_margin(margin: float, source: str = "scale_margin") -> float:
    margin = float(margin)
    if not (math.isfinite(margin) and 0.0 <= margin <= MAX_SCALE_MARGIN):
        raise ModelError(f"{source} must be a finite number in [0, {MAX_SCALE_MARGIN:g}], got {margin}")
    return margin


def _scale(X: np.ndarray, lo: np.ndarray, inv: np.ndarray, margin: float) -> np.ndarray:
    out = (X - lo) * inv
    # A NaN (a missing sensor reading) becomes 0 rather than poisoning the score;
    # everything else is clipped to [-margin, 1 + margin].
    np.nan_to_num(out, copy=False, nan=0.0)
    np.fmax(out, np.float32(-margin), out=out)
    np.fmin(out, np.float32(1.0 + margin), out=out)
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------- threshold


def threshold_from_errors(errors, percentile: float = SEED_PERCENTILE, factor: float = 1.0) -> float:
    """``factor`` (>= 1) times the ``percentile``-th percentile (linear interpolation) of training
    errors ([training] threshold_factor)."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if errors.size == 0:
        raise ValueError("cannot pick a threshold from no errors")
    if not np.all(np.isfinite(errors)):
        raise ValueError("errors contain NaN or infinity")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"threshold_factor must be a finite number >= 1, got {factor}")
    return float(factor) * float(np.percentile(errors, percentile))


def epochs_for(n_windows: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """At least ``epochs``, and enough of them for ``min_steps`` gradient steps in all.

    The seed's 10 epochs were over thousands of windows; on the 50-odd windows of a
    few minutes of one node they are 50 steps, after which the model barely tracks its
    inputs (its outputs varied with a std of 0.039 against 0.126 for the inputs).
    """
    batches = max(1, math.ceil(n_windows / max(1, batch_size)))
    return max(epochs, math.ceil(min_steps / batches))


def fold_errors(X: np.ndarray, *, folds: int, epochs: int, batch_size: int, lr: float,
                seed: int = 0, hidden: Sequence[int] = SEED_HIDDEN) -> np.ndarray:
    """Each window's reconstruction error under a model that was *not* trained on it.

    Window ``i`` of ``X`` (scaled, in time order) goes to fold ``i % folds``; each fold is
    scored by a model trained on the others. A percentile of these errors is what new
    normal windows will score: the training errors of the final model are lower, and a
    threshold from them flagged 3-98 % of new normal windows in measurements instead of
    the 2 % asked for (the better the fit, the worse). Interleaved, not contiguous: a
    node's normal windows come in phases (quiet, busy, idle), and a contiguous block
    held out is a phase the other folds never saw, so its errors (and the threshold)
    were those of a fault; recall on a test fault fell from 0.79 to 0.57. Neighbours
    are alike, so this estimate is a little optimistic; it is far closer than the
    training errors.
    """
    n = X.shape[0]
    if folds < 2 or n < folds:
        raise ValueError(f"need at least {max(folds, 2)} windows for {folds} folds, got {n}")
    out = np.empty(n, np.float64)
    for k in range(folds):
        block = np.arange(k, n, folds)
        keep = np.ones(n, bool)
        keep[block] = False
        ae = Autoencoder(X.shape[1], hidden=hidden, seed=seed + 1 + k)
        ae.fit(X[keep], epochs=epochs, batch_size=batch_size, lr=lr)
        out[block] = ae.reconstruction_error(X[block])
    return out


@dataclass(frozen=True)
class Fitted:
    ae: Autoencoder
    scaler: MinMaxScaler
    threshold: float
    epochs: int
    losses: list[float]


def fit_detector(X_raw, *, epochs: int, batch_size: int, lr: float, percentile: float,
                 min_steps: int, folds: int, seed: int = 0, scale_margin: float = SCALE_MARGIN,
                 threshold_factor: float = 1.0, hidden: Sequence[int] = SEED_HIDDEN) -> Fitted:
    """The live training recipe: scaler, autoencoder and threshold from raw normal windows.

    * the scaler is fitted on every window (clipping at ``scale_margin`` spans past it);
    * the autoencoder is trained on every window for :func:`epochs_for` epochs;
    * the threshold is ``threshold_factor`` times the ``percentile`` of :func:`fold_errors`
      (``folds`` >= 2), or of the final model's own training errors with ``folds = 0`` (the
      seed's rule).
    """
    X = np.asarray(X_raw, dtype=np.float32)
    scaler = MinMaxScaler(margin=scale_margin).fit(X)
    Xs = scaler.transform(X)
    n_epochs = epochs_for(Xs.shape[0], batch_size, epochs, min_steps)
    ae = Autoencoder(Xs.shape[1], hidden=hidden, seed=seed)
    losses = ae.fit(Xs, epochs=n_epochs, batch_size=batch_size, lr=lr)
    if folds:
        errors = fold_errors(Xs, folds=folds, epochs=n_epochs, batch_size=batch_size, lr=lr,
                             seed=seed, hidden=hidden)
    else:
        errors = ae.reconstruction_error(Xs)
    return Fitted(ae, scaler, threshold_from_errors(errors, percentile, threshold_factor), n_epochs, losses)


class NodeVerdict:
    """The node's verdict from its windows' verdicts, with hysteresis.

    A window's verdict alone flags about one normal window in fifty (the 98th
    percentile); a dispatcher that stopped using a node on each of those would
    lose healthy nodes all the time. The node turns anomalous after ``confirm``
    anomalous windows in a row, and normal again after ``confirm`` normal ones
    (as an alert's ``for`` and ``keep_firing_for``). With independent windows at
    a 2 % false-alarm rate, 3 in a row is 8 in a million windows; a fault is
    reported ``confirm - 1`` windows later than its first flagged window.
    ``confirm = 1`` is the window's own verdict.
    """

    def __init__(self, confirm: int) -> None:
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {confirm}")
        self.confirm = confirm
        self.anomalous = False
        self._streak = 0  # windows in a row that disagree with the current verdict

    def update(self, window_anomalous: bool) -> bool:
        """Feed one scored window; returns the node's verdict after it."""
        if window_anomalous == self.anomalous:
            self._streak = 0
        else:
            self._streak += 1
            if self._streak >= self.confirm:
                self.anomalous, self._streak = window_anomalous, 0
        return self.anomalous


# -------------------------------------------------------------------- autoencoder


class Autoencoder:
    """Dense autoencoder, float32, trained with RMSProp on the batch RMSE."""

    RHO = np.float32(0.9)
    EPS = np.float32(1e-7)

    def __init__(self, n_features: int, hidden: Sequence[int] = SEED_HIDDEN, seed: int = 0):
        if n_features < 1:
            raise ValueError("n_features must be >= 1")
        self.n_features = int(n_features)
        self.hidden = tuple(int(h) for h in hidden)
        self.sizes = (self.n_features, *self.hidden, self.n_features)
        self.rng = np.random.default_rng(seed)
        self.params: list[np.ndarray] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            W = self.rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
            self.params += [W, np.zeros(fan_out, np.float32)]

    @classmethod
    def from_weights(cls, weights: Sequence[np.ndarray]) -> Autoencoder:
        """An autoencoder with the architecture implied by ``weights``."""
        if len(weights) < 4 or len(weights) % 2:
            raise ModelError(f"expected an even number (>= 4) of weight arrays, got {len(weights)}")
        n = int(np.asarray(weights[0]).shape[0])
        hidden = [int(np.asarray(w).shape[1]) for w in weights[0:-2:2]]
        ae = cls(n, hidden=hidden)
        ae.set_weights(weights)
        return ae

    @property
    def n_params(self) -> int:
        return sum(p.size for p in self.params)

    def get_weights(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def set_weights(self, ws: Sequence[np.ndarray]) -> None:
        if len(ws) != len(self.params):
            raise ModelError(f"expected {len(self.params)} weight arrays, got {len(ws)}")
        new = []
        for i, (w, p) in enumerate(zip(ws, self.params, strict=True)):
            w = np.asarray(w, dtype=np.float32)
            if w.shape != p.shape:
                raise ModelError(f"weight array {i} has shape {w.shape}, expected {p.shape}")
            if not np.all(np.isfinite(w)):
                raise ModelError(f"weight array {i} contains NaN or infinity")
            new.append(w.copy())
        self.params = new

    # -- forward / backward

    def _forward(self, X: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer, input first, reconstruction last."""
        acts = [X]
        h = X
        last = len(self.params) // 2 - 1
        for i in range(0, len(self.params), 2):
            z = h @ self.params[i]
            z += self.params[i + 1]
            h = _sigmoid(z) if i // 2 == last else np.maximum(z, 0.0, out=z)
            acts.append(h)
        return acts

    def reconstruct(self, X) -> np.ndarray:
        X = self._check(X)
        out = np.empty_like(X)
        for start in range(0, X.shape[0], 4096):
            out[start:start + 4096] = self._forward(X[start:start + 4096])[-1]
        return out

    def reconstruction_error(self, X) -> np.ndarray:
        """Per row: mean over features of the squared reconstruction error (float64)."""
        X = self._check(X)
        err = np.empty(X.shape[0], np.float64)
        for start in range(0, X.shape[0], 4096):
            chunk = X[start:start + 4096]
            diff = self._forward(chunk)[-1] - chunk
            err[start:start + 4096] = np.mean(diff * diff, axis=1, dtype=np.float64)
        return err

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected shape (N, {self.n_features}), got {X.shape}")
        return X

    def fit(
        self,
        X,
        epochs: int = SEED_EPOCHS,
        batch_size: int = SEED_BATCH_SIZE,
        lr: float = SEED_LR,
    ) -> list[float]:
        """Train on (scaled) normal windows; returns the mean batch loss of each epoch.

        The optimizer state starts fresh at every call, as in a Flower client that
        builds its model anew for each round.
        """
        X = self._check(X)
        if X.shape[0] == 0:
            raise ValueError("cannot train on zero windows")
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        lr32 = np.float32(lr)
        rho, one_minus_rho, eps = self.RHO, np.float32(1.0) - self.RHO, self.EPS
        sq = [np.zeros_like(p) for p in self.params]
        losses: list[float] = []
        n = X.shape[0]
        for _ in range(epochs):
            order = self.rng.permutation(n)
            total, batches = 0.0, 0
            for start in range(0, n, batch_size):
                loss, grads = self.loss_and_gradients(X[order[start:start + batch_size]])
                total += loss
                batches += 1
                for j, g in enumerate(grads):
                    s = sq[j]
                    s *= rho
                    s += one_minus_rho * (g * g)
                    # Dead ReLU units drive moments into float32 denormals, which
                    # are very slow on x86: flush them to zero.
                    s[s < 1e-30] = 0.0
                    self.params[j] -= lr32 * g / (np.sqrt(s) + eps)
            losses.append(total / batches)
        return losses

    def loss_and_gradients(self, xb: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Batch RMSE and its gradient with respect to every parameter (backprop)."""
        acts = self._forward(xb)
        y = acts[-1]
        diff = y - xb
        rmse = math.sqrt(float(np.mean(diff * diff)))
        grads: list[np.ndarray] = [np.zeros_like(p) for p in self.params]
        if rmse == 0.0:
            return rmse, grads
        # d(RMSE)/dy, then through the output sigmoid.
        delta = diff * np.float32(1.0 / (diff.size * rmse))
        delta *= y * (np.float32(1.0) - y)
        for layer in range(len(self.params) // 2 - 1, -1, -1):
            grads[2 * layer] = acts[layer].T @ delta
            grads[2 * layer + 1] = delta.sum(axis=0)
            if layer:
                delta = delta @ self.params[2 * layer].T
                delta *= acts[layer] > 0  # ReLU derivative of the layer below
        return rmse, grads


def _sigmoid(z: np.ndarray) -> np.ndarray:
    np.clip(z, -60.0, 60.0, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    z += 1.0
    return np.reciprocal(z, out=z)


# ----------------------------------------------------------------------- ONNX out


def build_onnx(ae: Autoencoder, scaler: MinMaxScaler, feature_names: Sequence[str],
               threshold: float, *, extra_metadata: dict[str, str] | None = None):
    """The ``onnx.ModelProto`` for ``ae`` with the shoal metadata (checked)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [str(n) for n in feature_names]
    F = ae.n_features
    if len(names) != F or scaler.n_features != F:
        raise ModelError(
            f"feature count mismatch: autoencoder {F}, scaler {scaler.n_features}, names {len(names)}")
    if len(set(names)) != F:
        raise ModelError("feature names are not unique")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ModelError(f"threshold must be finite and >= 0, got {threshold}")

    nodes, inits = [], []
    h = "input"
    n_layers = len(ae.params) // 2
    for layer in range(n_layers):
        w, b = f"W{layer}", f"b{layer}"
        inits += [numpy_helper.from_array(ae.params[2 * layer], w),
                  numpy_helper.from_array(ae.params[2 * layer + 1], b)]
        z = f"z{layer}"
        nodes.append(helper.make_node("Gemm", [h, w, b], [z], name=f"dense{layer}"))
        last = layer == n_layers - 1
        h = "reconstruction" if last else f"h{layer}"
        nodes.append(helper.make_node("Sigmoid" if last else "Relu", [z], [h],
                                      name=f"act{layer}"))
    graph = helper.make_graph(
        nodes, "shoal_autoencoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", F])],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name="shoal",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    meta = metadata_dict(names, scaler.lo, scaler.hi, threshold, scaler.margin)
    for k, v in (extra_metadata or {}).items():
        if k in meta:
            raise ModelError(f"extra metadata may not override {k}")
        meta[str(k)] = str(v)
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def metadata_dict(feature_names: Sequence[str], lo, hi, threshold: float,
                  scale_margin: float = SCALE_MARGIN) -> dict[str, str]:
    """The shoal metadata keys for a model (for exporters other than ours, too)."""
    return {
        "shoal.format_version": FORMAT_VERSION,
        "shoal.feature_names": json.dumps(list(feature_names)),
        "shoal.scaler_min": json.dumps([float(v) for v in np.asarray(lo, np.float32)]),
        "shoal.scaler_max": json.dumps([float(v) for v in np.asarray(hi, np.float32)]),
        "shoal.threshold": repr(float(threshold)),
        "shoal.scale_margin": repr(check_scale_margin(scale_margin)),
    }


def onnx_bytes(ae: Autoencoder, scaler: MinMaxScaler, feature_names: Sequence[str],
               threshold: float, *, extra_metadata: dict[str, str] | None = None) -> bytes:
    """The model file's bytes (:func:`build_onnx`, serialised); the caller writes them
    (atomically: ``shoal.daemons.telemetry.trainer.export_onnx``)."""
    model = build_onnx(ae, scaler, feature_names, threshold, extra_metadata=extra_metadata)
    return bytes(model.SerializeToString())


# ----------------------------------------------------------------------- detector


class Detector:
    """Scores raw feature rows with an ONNX autoencoder and the metadata in its file."""

    def __init__(self, session, input_name: str, feature_names: list[str], lo: np.ndarray,
                 hi: np.ndarray, threshold: float, metadata: dict[str, str], source: str,
                 scale_margin: float = SCALE_MARGIN):
        self._session = session
        self._input = input_name
        self.feature_names = feature_names
        self.lo = lo
        self.hi = hi
        self._inv = _inverse_span(lo, hi)
        self.threshold = float(threshold)
        self.scale_margin = scale_margin
        self.metadata = metadata
        self.source = source

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def load(cls, path) -> Detector:
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise ModelError(f"model {path} is {size} bytes, over the {MAX_MODEL_BYTES} limit")
            data = path.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read model {path}: {e.strerror or e}") from None
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Detector:
        import onnx
        import onnxruntime as ort

        if not data:
            raise ModelError(f"model {source} is empty")
        try:
            model = onnx.load_from_string(data)
        except Exception as e:  # protobuf DecodeError and friends
            raise ModelError(f"model {source} is not a valid ONNX file (truncated or corrupt): "
                             f"{_one_line(e)}") from None
        if len(model.graph.node) == 0:
            raise ModelError(f"model {source} has an empty graph (truncated or not a model)")
        meta = {p.key: p.value for p in model.metadata_props}
        names, lo, hi, threshold, margin = _parse_metadata(meta, source)
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise ModelError(f"model {source} fails onnx.checker: {_one_line(e)}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, sess_options=opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load model {source}: {_one_line(e)}") from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"model {source} has {len(inputs)} inputs, expected 1")
        shape = inputs[0].shape
        F = len(names)
        if len(shape) != 2:
            raise ModelError(f"model {source} input has rank {len(shape)}, expected 2 ([N, F])")
        if isinstance(shape[1], int) and shape[1] != F:
            raise ModelError(f"feature count mismatch in {source}: the graph takes {shape[1]} "
                             f"features, the metadata lists {F}")
        det = cls(session, inputs[0].name, names, lo, hi, threshold, meta, source, margin)
        # One probe row catches graphs whose output does not match the input width.
        try:
            out = det._run(np.zeros((1, F), np.float32))
        except Exception as e:
            raise ModelError(f"model {source} fails on a probe input: {_one_line(e)}") from None
        if out.shape != (1, F):
            raise ModelError(f"feature count mismatch in {source}: output shape {tuple(out.shape)}"
                             f" for one window of {F} features")
        return det

    def _run(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run(None, {self._input: scaled})[0])

    def scale(self, X_raw) -> np.ndarray:
        X = np.asarray(X_raw, dtype=np.float32)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got shape {X.shape}")
        return _scale(X, self.lo, self._inv, self.scale_margin)

    def score(self, X_raw) -> np.ndarray:
        """Raw (unscaled) rows in ``feature_names`` order -> per-row score (float64)."""
        scaled = self.scale(X_raw)
        diff = self._run(scaled).astype(np.float32, copy=False) - scaled
        return np.einsum("ij,ij->i", diff, diff).astype(np.float64) / self.n_features

    def is_anomalous(self, scores) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def with_threshold(self, t: float) -> Detector:
        t = float(t)
        if not (math.isfinite(t) and t >= 0):
            raise ModelError(f"threshold must be finite and >= 0, got {t}")
        return Detector(self._session, self._input, self.feature_names, self.lo, self.hi, t,
                        {**self.metadata, "shoal.threshold": repr(t)}, self.source, self.scale_margin)

    def require_features(self, names: Iterable[str]) -> None:
        """Raise ModelError unless ``names`` is exactly this model's feature list."""
        names = list(names)
        if names == self.feature_names:
            return
        if len(names) != self.n_features:
            raise ModelError(f"feature count mismatch: the model {self.source} expects "
                             f"{self.n_features} features, the collector has {len(names)}")
        for i, (a, b) in enumerate(zip(self.feature_names, names, strict=True)):
            if a != b:
                raise ModelError(f"feature mismatch at column {i}: the model {self.source} "
                                 f"expects {a!r}, the collector has {b!r}")


def _parse_metadata(meta: dict[str, str], source: str):
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ModelError(f"model {source} lacks metadata key(s) {', '.join(missing)}")
    version = meta["shoal.format_version"]
    if version != FORMAT_VERSION:
        raise ModelError(f"model {source} has shoal.format_version {version!r}, "
                         f"this build reads {FORMAT_VERSION!r}")

    def json_list(key):
        try:
            value = json.loads(meta[key])
        except ValueError as e:
            raise ModelError(f"model {source}: {key} is not valid JSON ({_one_line(e)})") from None
        if not isinstance(value, list):
            raise ModelError(f"model {source}: {key} must be a JSON list")
        if len(value) > MAX_FEATURES:
            raise ModelError(f"model {source}: {key} has {len(value)} entries, over {MAX_FEATURES}")
        return value

    names = json_list("shoal.feature_names")
    if not names or not all(isinstance(n, str) for n in names):
        raise ModelError(f"model {source}: shoal.feature_names must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise ModelError(f"model {source}: shoal.feature_names has duplicates")
    bounds = []
    for key in ("shoal.scaler_min", "shoal.scaler_max"):
        values = json_list(key)
        if len(values) != len(names):
            raise ModelError(f"feature count mismatch in {source}: {key} has {len(values)} "
                             f"entries, shoal.feature_names has {len(names)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values):
            raise ModelError(f"model {source}: {key} must hold finite numbers")
        bounds.append(np.asarray(values, np.float32))
    lo, hi = bounds
    if np.any(hi < lo):
        i = int(np.argmax(hi < lo))
        raise ModelError(f"model {source}: scaler max < min for feature {names[i]!r}")
    try:
        threshold = float(meta["shoal.threshold"])
    except ValueError:
        raise ModelError(f"model {source}: shoal.threshold {meta['shoal.threshold']!r} "
                         "is not a number") from None
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ModelError(f"model {source}: shoal.threshold must be finite and >= 0")
    try:
        margin = float(meta.get("shoal.scale_margin", SCALE_MARGIN))
    except ValueError:
        raise ModelError(f"model {source}: shoal.scale_margin {meta['shoal.scale_margin']!r} "
                         "is not a number") from None
    return names, lo, hi, threshold, check_scale_margin(margin, f"model {source}: shoal.scale_margin")
