"""The autoencoder, the scaler, the threshold, the ONNX file and the detector."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shoal.core.telemetry.model import (
    FORMAT_VERSION,
    Autoencoder,
    Detector,
    MinMaxScaler,
    ModelError,
    build_onnx,
    fit_detector,
    fold_errors,
    metadata_dict,
    threshold_from_errors,
)
from shoal.daemons.telemetry.config import TrainingSection
from shoal.daemons.telemetry.trainer import export_onnx

# ------------------------------------------------------------------ scaler


def test_scaler_maps_training_range_to_unit_interval_and_bounds_the_rest():
    X = np.array([[0.0, 10.0, 5.0], [2.0, 20.0, 5.0], [1.0, 15.0, 5.0]])
    sc = MinMaxScaler().fit(X)
    assert sc.lo.tolist() == [0.0, 10.0, 5.0]
    assert sc.hi.tolist() == [2.0, 20.0, 5.0]
    out = sc.transform(X)
    np.testing.assert_allclose(out, [[0, 0, 0], [1, 1, 0], [0.5, 0.5, 0]])
    # Outside the training range: kept up to one span beyond it, so [-1, 2];
    # constant feature: 0; NaN: 0.
    out = sc.transform([[-5.0, 40.0, 7.0], [np.nan, 12.5, 5.0], [3.0, 5.0, 5.0]])
    np.testing.assert_allclose(out, [[-1, 2, 0], [0, 0.25, 0], [1.5, -0.5, 0]])
    assert out.dtype == np.float32


def test_scaler_margin_sets_how_far_past_the_range_a_value_counts():
    sc = MinMaxScaler(margin=9.0).fit([[0.0], [2.0]])
    np.testing.assert_allclose(sc.transform([[-100.0], [5.0], [100.0]]), [[-9.0], [2.5], [10.0]])
    np.testing.assert_allclose(MinMaxScaler(margin=0.0).fit([[0.0], [2.0]]).transform([[5.0]]), [[1.0]])


def test_scaler_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        MinMaxScaler().fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        MinMaxScaler().fit([[1.0, np.inf]])
    sc = MinMaxScaler().fit([[0.0, 1.0]])
    with pytest.raises(ValueError, match="expected 2 features"):
        sc.transform([[1.0, 2.0, 3.0]])


# --------------------------------------------------------------- threshold


def test_threshold_is_linear_percentile_of_training_errors():
    errors = np.arange(1, 101, dtype=float)  # 1..100
    # position 0.98 * 99 = 97.02 -> 98 + 0.02 * (99 - 98)
    assert threshold_from_errors(errors) == pytest.approx(98.02)
    assert threshold_from_errors(errors, 50) == pytest.approx(50.5)
    assert threshold_from_errors(errors, 100) == 100.0
    assert threshold_from_errors([3.0]) == 3.0


@pytest.mark.parametrize("errors,pct,msg", [
    ([], 98, "no errors"),
    ([1.0, np.nan], 98, "NaN"),
    ([1.0], 101, "percentile"),
    ([1.0], -1, "percentile"),
])
def test_threshold_rejects_bad_input(errors, pct, msg):
    with pytest.raises(ValueError, match=msg):
        threshold_from_errors(errors, pct)


# ------------------------------------------------------------- autoencoder


def test_architecture_is_the_seeds():
    ae = Autoencoder(460)
    shapes = [w.shape for w in ae.get_weights()]
    assert shapes[0::2] == [(460, 80), (80, 60), (60, 40), (40, 20), (20, 40), (40, 60),
                            (60, 80), (80, 460)]
    assert ae.n_params == 90_440  # the figure in shared/notes/flower.md


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    ae = Autoencoder(6, hidden=(5, 3, 5), seed=3)
    ae.params = [p.astype(np.float64) for p in ae.params]  # exact arithmetic for the check
    for i in range(1, len(ae.params), 2):  # non-zero biases keep ReLUs away from kinks
        ae.params[i] = rng.uniform(0.05, 0.2, ae.params[i].shape)
    xb = rng.uniform(0, 1, (7, 6))
    _, grads = ae.loss_and_gradients(xb)
    h = 1e-6
    for j, p in enumerate(ae.params):
        for idx in [tuple(rng.integers(0, s) for s in p.shape) for _ in range(4)]:
            old = p[idx]
            p[idx] = old + h
            up, _ = ae.loss_and_gradients(xb)
            p[idx] = old - h
            down, _ = ae.loss_and_gradients(xb)
            p[idx] = old
            assert grads[j][idx] == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-8)


def _manifold(rng, n, F=24, d=3):
    """Normal data on a smooth low-dimensional manifold inside [0, 1]^F."""
    A = rng.normal(size=(d, F))
    z = rng.uniform(-1, 1, size=(n, d))
    return 1 / (1 + np.exp(-(z @ A))) * 0.8 + 0.1 + rng.normal(0, 0.01, (n, F))


def test_autoencoder_learns_and_flags_anomalies():
    rng = np.random.default_rng(7)
    normal = _manifold(rng, 3000)
    train, held_out = normal[:2500], normal[2500:]
    sc = MinMaxScaler().fit(train)
    ae = Autoencoder(train.shape[1], hidden=(16, 8, 4, 8, 16), seed=0)
    losses = ae.fit(sc.transform(train), epochs=20, batch_size=32, lr=3e-3)
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0]
    thr = threshold_from_errors(ae.reconstruction_error(sc.transform(train)))
    # Anomalies: a third of the sensors stuck at an extreme value.
    anomalies = held_out.copy()
    anomalies[:, ::3] = rng.choice([0.0, 1.0], size=anomalies[:, ::3].shape)
    flagged = ae.reconstruction_error(sc.transform(anomalies)) > thr
    false_alarms = ae.reconstruction_error(sc.transform(held_out)) > thr
    assert flagged.mean() >= 0.95
    assert false_alarms.mean() <= 0.10


def test_weights_round_trip_and_are_checked():
    ae = Autoencoder(10, hidden=(6, 3, 6), seed=1)
    other = Autoencoder(10, hidden=(6, 3, 6), seed=2)
    X = np.random.default_rng(0).uniform(size=(5, 10))
    assert not np.allclose(ae.reconstruct(X), other.reconstruct(X))
    other.set_weights(ae.get_weights())
    np.testing.assert_array_equal(ae.reconstruct(X), other.reconstruct(X))
    clone = Autoencoder.from_weights(ae.get_weights())
    assert clone.sizes == (10, 6, 3, 6, 10)
    np.testing.assert_array_equal(clone.reconstruct(X), ae.reconstruct(X))
    ws = ae.get_weights()
    with pytest.raises(ModelError, match="expected 8 weight arrays"):
        ae.set_weights(ws[:-1])
    with pytest.raises(ModelError, match="shape"):
        ae.set_weights([ws[0].T] + ws[1:])
    ws[3] = ws[3] * np.nan
    with pytest.raises(ModelError, match="NaN"):
        ae.set_weights(ws)


# ------------------------------------------------------------------- ONNX


def _trained(F=12, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.normal(50, 10, size=(400, F))
    sc = MinMaxScaler().fit(raw)
    ae = Autoencoder(F, hidden=(8, 6, 4, 6, 8), seed=seed)
    ae.fit(sc.transform(raw), epochs=2, batch_size=32, lr=1e-3)
    names = [f"m{i}_mean" for i in range(F)]
    thr = threshold_from_errors(ae.reconstruction_error(sc.transform(raw)))
    return ae, sc, names, thr, raw


def test_export_passes_checker_with_supported_ir_and_opset(tmp_path):
    ae, sc, names, thr, _ = _trained()
    path = tmp_path / "m.onnx"
    export_onnx(ae, sc, names, thr, path, extra_metadata={"shoal.node": "n1"})
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert 8 <= model.ir_version <= 13
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["shoal.feature_names"]) == names
    assert json.loads(meta["shoal.scaler_min"]) == pytest.approx(sc.lo.tolist())
    assert json.loads(meta["shoal.scaler_max"]) == pytest.approx(sc.hi.tolist())
    assert float(meta["shoal.threshold"]) == thr
    assert meta["shoal.format_version"] == FORMAT_VERSION
    assert meta["shoal.node"] == "n1"


def test_numpy_and_onnxruntime_agree_on_random_inputs(tmp_path):
    ae, sc, names, thr, raw = _trained(F=40, seed=3)
    path = tmp_path / "m.onnx"
    export_onnx(ae, sc, names, thr, path)
    det = Detector.load(path)
    assert det.feature_names == names and det.threshold == thr
    rng = np.random.default_rng(11)
    # In range, out of range (clipped) and a single row.
    for X in (rng.normal(50, 10, (257, 40)), rng.normal(50, 40, (64, 40)), raw[:1]):
        want = ae.reconstruction_error(sc.transform(X))
        got = det.score(X)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(det.is_anomalous(got), got > thr)
    assert det.score(raw[0]).shape == (1,)
    with pytest.raises(ValueError, match="40 features"):
        det.score(np.zeros((2, 39)))


def _hand_built(path, F=5, *, meta=None, width=None, halve=True):
    """An 'autoencoder' from another framework: y = 0.5 * x, input named 'dense_input'."""
    width = width or F
    half = numpy_helper.from_array(np.full((width,), 0.5 if halve else 1.0, np.float32), "half")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["dense_input", "half"], ["out"])], "keras_like",
        [helper.make_tensor_value_info("dense_input", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, width])],
        initializer=[half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    if meta is None:
        meta = {
            "shoal.format_version": "1",
            "shoal.feature_names": json.dumps([f"f{i}" for i in range(F)]),
            "shoal.scaler_min": json.dumps([0.0] * F),
            "shoal.scaler_max": json.dumps([10.0] * F),
            "shoal.threshold": "0.05",
        }
    helper.set_model_props(model, meta)
    path.write_bytes(model.SerializeToString())
    return path


def test_detector_accepts_a_foreign_autoencoder_with_the_metadata(tmp_path):
    det = Detector.load(_hand_built(tmp_path / "foreign.onnx"))
    assert det.feature_names == ["f0", "f1", "f2", "f3", "f4"]
    assert det.threshold == 0.05
    raw = np.array([[0, 0, 0, 0, 0], [10, 10, 10, 10, 10], [2, 4, 6, 8, 20]], float)
    x = np.clip(raw / 10.0, -1, 2)
    # score = mean((0.5 x - x)^2) = mean(0.25 x^2)
    np.testing.assert_allclose(det.score(raw), np.mean(0.25 * x * x, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(det.is_anomalous(det.score(raw)), [False, True, True])


def test_with_threshold_returns_a_new_detector(tmp_path):
    det = Detector.load(_hand_built(tmp_path / "m.onnx"))
    stricter = det.with_threshold(0.5)
    assert stricter.threshold == 0.5 and det.threshold == 0.05
    raw = np.full((1, 5), 10.0)
    assert det.is_anomalous(det.score(raw)).tolist() == [True]
    assert stricter.is_anomalous(stricter.score(raw)).tolist() == [False]
    with pytest.raises(ModelError, match="threshold"):
        det.with_threshold(float("nan"))


def test_require_features(tmp_path):
    det = Detector.load(_hand_built(tmp_path / "m.onnx"))
    det.require_features(["f0", "f1", "f2", "f3", "f4"])
    with pytest.raises(ModelError, match="expects 5 features, the collector has 4"):
        det.require_features(["f0", "f1", "f2", "f3"])
    with pytest.raises(ModelError, match="column 2"):
        det.require_features(["f0", "f1", "x", "f3", "f4"])


# ------------------------------------------------------- refusing bad models


def _meta(F=5, **changes):
    meta = {
        "shoal.format_version": "1",
        "shoal.feature_names": json.dumps([f"f{i}" for i in range(F)]),
        "shoal.scaler_min": json.dumps([0.0] * F),
        "shoal.scaler_max": json.dumps([10.0] * F),
        "shoal.threshold": "0.05",
    }
    for k, v in changes.items():
        key = "shoal." + k
        if v is None:
            del meta[key]
        else:
            meta[key] = v
    return meta


@pytest.mark.parametrize("meta,message", [
    (_meta(threshold=None), "lacks metadata key(s) shoal.threshold"),
    (_meta(feature_names=None, scaler_min=None),
     "lacks metadata key(s) shoal.feature_names, shoal.scaler_min"),
    (_meta(format_version="2"), "format_version '2'"),
    (_meta(feature_names="[f0"), "shoal.feature_names is not valid JSON"),
    (_meta(feature_names='"f0"'), "must be a JSON list"),
    (_meta(feature_names=json.dumps(["a", "a", "b", "c", "d"])), "duplicates"),
    (_meta(scaler_min=json.dumps([0.0] * 4)), "shoal.scaler_min has 4 entries"),
    (_meta(scaler_max=json.dumps([1.0, 1.0, "x", 1.0, 1.0])), "finite numbers"),
    (_meta(scaler_max=json.dumps([-1.0] * 5)), "max < min"),
    (_meta(threshold="abc"), "is not a number"),
    (_meta(threshold="-1"), "finite and >= 0"),
    (_meta(threshold="inf"), "finite and >= 0"),
])
def test_wrong_or_missing_metadata_is_refused(tmp_path, meta, message):
    path = _hand_built(tmp_path / "bad.onnx", meta=meta)
    with pytest.raises(ModelError) as info:
        Detector.load(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text and "\n" not in text


def test_feature_count_mismatch_between_graph_and_metadata(tmp_path):
    path = _hand_built(tmp_path / "wide.onnx", F=5, width=7, meta=_meta(F=5))
    with pytest.raises(ModelError, match="feature count mismatch.*graph takes 7 features, "
                                         "the metadata lists 5"):
        Detector.load(path)


def test_graph_with_dynamic_width_but_wrong_output_is_refused(tmp_path):
    # Output width differs from the input: caught by the probe row.
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], "narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, _meta(F=5))
    path = tmp_path / "narrow.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=r"output shape \(1, 1\) for one window of 5"):
        Detector.load(path)


def test_truncated_file_is_refused(tmp_path):
    ae, sc, names, thr, _ = _trained()
    good = tmp_path / "good.onnx"
    export_onnx(ae, sc, names, thr, good)
    data = good.read_bytes()
    Detector.load(good)  # the intact file loads
    for cut in (len(data) // 2, len(data) - 7, 3):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelError) as info:
            Detector.load(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_missing_empty_and_garbage_files_are_refused(tmp_path):
    with pytest.raises(ModelError, match="cannot read model"):
        Detector.load(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        Detector.load(tmp_path / "empty.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelError, match="not a valid ONNX file"):
        Detector.load(tmp_path / "junk.onnx")


def test_exporter_refuses_inconsistent_inputs():
    ae, sc, names, thr, _ = _trained()
    with pytest.raises(ModelError, match="feature count mismatch"):
        build_onnx(ae, sc, names[:-1], thr)
    with pytest.raises(ModelError, match="unique"):
        build_onnx(ae, sc, names[:-1] + names[:1], thr)
    with pytest.raises(ModelError, match="threshold"):
        build_onnx(ae, sc, names, float("nan"))
    with pytest.raises(ModelError, match="override"):
        build_onnx(ae, sc, names, thr, extra_metadata={"shoal.threshold": "0"})


def test_metadata_dict_is_what_detector_reads(tmp_path):
    meta = metadata_dict(["a", "b"], [0.0, 1.0], [2.0, 3.0], 0.25)
    path = _hand_built(tmp_path / "m.onnx", F=2, meta=meta)
    det = Detector.load(path)
    assert det.feature_names == ["a", "b"] and det.threshold == 0.25
    np.testing.assert_allclose(det.scale([[1.0, 3.0]]), [[0.5, 1.0]])


def test_a_models_scale_margin_is_read_from_its_metadata_and_checked(tmp_path):
    meta = metadata_dict(["a", "b"], [0.0, 0.0], [1.0, 1.0], 0.25, scale_margin=9.0)
    assert meta["shoal.scale_margin"] == "9.0"
    det = Detector.load(_hand_built(tmp_path / "m.onnx", F=2, meta=meta))
    np.testing.assert_allclose(det.scale([[5.0, 50.0]]), [[5.0, 10.0]])
    assert det.with_threshold(1.0).scale([[50.0, 0.0]]).tolist() == [[10.0, 0.0]]
    # absent (a model exported elsewhere before the key existed): one span, as before
    old = {k: v for k, v in meta.items() if k != "shoal.scale_margin"}
    np.testing.assert_allclose(Detector.load(_hand_built(tmp_path / "old.onnx", F=2, meta=old)).scale([[5.0, 50.0]]),
                               [[2.0, 2.0]])
    for bad in ("nan", "-1", "1e9", "wide"):
        path = _hand_built(tmp_path / "bad.onnx", F=2, meta={**meta, "shoal.scale_margin": bad})
        with pytest.raises(ModelError, match="shoal.scale_margin") as e:
            Detector.load(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="scale_margin"):
        metadata_dict(["a"], [0.0], [1.0], 0.25, scale_margin=-1.0)


# ------------------------------------------------------------ the live recipe


def _low_rank_windows(rng, n, F=40):
    """Normal windows of a node: 4 hidden load factors seen through F correlated metrics."""
    mix = np.random.default_rng(7).normal(size=(4, F))
    return rng.normal(size=(n, 4)) @ mix + 0.3 * rng.normal(size=(n, F)) + 10.0


def test_default_training_tracks_its_inputs_and_keeps_false_alarms_near_the_target(tmp_path):
    """``shoal telemetry train`` with its defaults, on the ~50 windows of a few live minutes.

    Before the live recipe (10 epochs; threshold from the training errors) the model's
    outputs varied half as much as its inputs and 3-8 % of new normal windows were
    flagged against the 2 % asked for (measured: mean 5.9 % over these seeds).
    """
    from shoal.daemons.telemetry.config import TrainingSection
    from shoal.daemons.telemetry.store import StoredWindow
    from shoal.daemons.telemetry.trainer import train_local

    t = TrainingSection()
    false_alarms = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        train, fresh = _low_rank_windows(rng, 48), _low_rank_windows(rng, 2000)
        names = [f"m{i}" for i in range(train.shape[1])]
        windows = [StoredWindow(float(k), k + 1.0, 5, dict(zip(names, map(float, row), strict=True)),
                                None, None, None, None) for k, row in enumerate(train)]
        path = tmp_path / f"m{seed}.onnx"
        train_local(windows, path, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, percentile=t.percentile,
                    min_windows=t.min_windows, min_steps=t.min_steps, folds=t.folds)
        det = Detector.load(path)
        order = [names.index(n) for n in det.feature_names]
        train, fresh = train[:, order], fresh[:, order]
        scaled = det.scale(train)  # the training range is [0, 1], the sigmoid's
        out = det._run(scaled)
        assert np.std(out, axis=0).mean() >= 0.7 * np.std(scaled, axis=0).mean()
        false_alarms.append(float(det.is_anomalous(det.score(fresh)).mean()))
    assert np.mean(false_alarms) <= 0.035, false_alarms


def test_a_value_past_the_training_range_raises_the_score():
    """A CPU hog drives a feature past its training maximum; clipping to [0, 1] hid it."""
    rng = np.random.default_rng(0)
    train = _low_rank_windows(rng, 48)
    fit = fit_detector(train, epochs=10, batch_size=10, lr=1e-3, percentile=100.0, min_steps=500, folds=0)
    busiest = train[np.argmax(train[:, 0])].copy()
    hog = busiest.copy()
    hog[0] = train[:, 0].max() + 3 * (train[:, 0].max() - train[:, 0].min())
    s_busy, s_hog = fit.ae.reconstruction_error(fit.scaler.transform(np.stack([busiest, hog])))
    assert s_busy <= fit.threshold < s_hog


def test_fold_errors_need_enough_windows():
    with pytest.raises(ValueError, match="5 folds"):
        fold_errors(np.zeros((3, 2), np.float32), folds=5, epochs=1, batch_size=1, lr=1e-3)


def test_node_verdict_needs_confirm_windows_in_a_row_both_ways():
    from shoal.core.telemetry.model import NodeVerdict

    v = NodeVerdict(3)
    # lone false alarms (and pairs) never flag the node
    seen = [v.update(w) for w in [True, False, True, True, False, False, True]]
    assert seen == [False] * 7
    # three in a row do, on the third
    assert [v.update(True) for _ in range(3)] == [False, True, True]  # the 7th above was the first
    # a lone normal window inside a fault does not clear it; three do
    assert [v.update(w) for w in [False, True, False, False, False]] == [True, True, True, True, False]
    assert [NodeVerdict(1).update(w) for w in (True, False)] == [True, False]
    with pytest.raises(ValueError, match="confirm"):
        NodeVerdict(0)


def test_held_out_threshold_holds_when_normal_comes_in_phases():
    """Quiet, busy and idle phases one after another: a held-out contiguous block was a phase the
    model never saw, the threshold a fault's, and a fault mixing two phases' metrics was missed."""
    recall, false_alarms = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        train = np.concatenate([_low_rank_windows(rng, 16) + shift for shift in (0.0, 4.0, -3.0)])
        fresh = np.concatenate([_low_rank_windows(rng, 300) + shift for shift in (0.0, 4.0, -3.0)])
        fault = _low_rank_windows(rng, 50)
        fault[:, :20] += 4.0  # half the metrics in the busy phase, half quiet
        # The shipped recipe's steps (with 500, recall over 8 seeds was 0.58, and 0.57 here)
        fit = fit_detector(train, epochs=10, batch_size=10, lr=1e-3, percentile=98.0,
                           min_steps=TrainingSection().min_steps, folds=5)

        def flagged(X, fit=fit):
            return fit.ae.reconstruction_error(fit.scaler.transform(X)) > fit.threshold

        recall.append(float(flagged(fault).mean()))
        false_alarms.append(float(flagged(fresh).mean()))
    assert np.mean(recall) >= 0.7 and np.mean(false_alarms) <= 0.035, (recall, false_alarms)


def test_threshold_factor_multiplies_the_held_out_threshold():
    rng = np.random.default_rng(3)
    train = _low_rank_windows(rng, 24, F=6)
    kw = dict(epochs=10, batch_size=4, lr=1e-3, percentile=100.0, min_steps=200, folds=4)
    one, ten = fit_detector(train, **kw), fit_detector(train, **kw, threshold_factor=10.0)
    assert ten.threshold == pytest.approx(10.0 * one.threshold) and one.threshold > 0
    with pytest.raises(ValueError, match="threshold_factor"):
        fit_detector(train, **kw, threshold_factor=0.5)


def test_a_wide_margin_and_factor_tell_an_ordinary_step_from_a_fault():
    """The demo's false alarms: an ordinary window a little past a quiet minute's range (two
    features 1.5 spans past their maximum), and a leak many spans past it on every feature,
    on heavy-tailed training windows (a quiet minute with a burst or two). Clipped at one span
    past the range, the step is flagged; with 9 spans and 10 times the largest held-out error
    it is normal, and the fault is flagged at more than 10 times the threshold."""
    kw = dict(epochs=30, batch_size=4, lr=1e-3, percentile=100.0, min_steps=500, folds=5)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        train = np.exp(1.5 * rng.normal(size=(20, 5)))
        lo, span = train.min(axis=0), np.ptp(train, axis=0)
        step = np.median(train, axis=0)
        step[:2] = lo[:2] + 2.5 * span[:2]
        fault = lo + 30.0 * span
        ratios = {}
        for margin, factor in ((1.0, 1.0), (9.0, 10.0)):
            fit = fit_detector(train, **kw, scale_margin=margin, threshold_factor=factor)
            ratios[margin] = fit.ae.reconstruction_error(fit.scaler.transform(np.stack([step, fault]))) / fit.threshold
        assert ratios[1.0][0] > 1 and ratios[1.0][1] > 1, (seed, ratios)
        assert ratios[9.0][0] < 1 < 10 < ratios[9.0][1], (seed, ratios)
