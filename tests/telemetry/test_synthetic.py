"""The synthetic cluster generator used by the experiment."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.lab.synthetic_cluster import FAULT_KINDS, ClusterSpec, catalogue, node_windows

SPEC = ClusterSpec(nodes=10, features=120, windows=3000, seed=5)


def test_layout_matches_the_spec():
    cat = catalogue(SPEC)
    names = cat.feature_names
    assert len(names) == 120 and len(set(names)) == 120
    assert names[0].endswith("_mean") and names[-1].endswith("_std")
    # Every metric kind of the collector is represented.
    for kind in ("cpu_util", "cpu_freq", "load", "mem", "swap", "disk", "net", "temp", "fan",
                 "power", "gpu_util", "procs"):
        assert len(cat.index(kind)) >= 1, kind
    X, y = node_windows(SPEC, 0, cat)
    assert X.shape == (3000, 120) and y.shape == (3000,)
    assert X.dtype == np.float32 and np.isfinite(X).all()
    assert (X[:, 60:] >= 0).all()  # standard deviations


def test_deterministic_per_node_and_seed():
    a, ya = node_windows(SPEC, 3)
    b, yb = node_windows(SPEC, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    c, _ = node_windows(SPEC, 4)
    assert not np.array_equal(a, c)
    d, _ = node_windows(ClusterSpec(nodes=10, features=120, windows=3000, seed=6), 3)
    assert not np.array_equal(a, d)


def test_anomaly_rates_and_scarce_nodes():
    ordinary = [node_windows(SPEC, k) for k in range(0, 8)]
    for _X, y in ordinary:
        assert (y != 0).mean() == pytest.approx(SPEC.anomaly_rate, abs=0.004)
    assert [SPEC.is_scarce(k) for k in range(10)] == [False] * 8 + [True] * 2
    X, y = node_windows(SPEC, 9)
    assert X.shape[0] == 300  # scarce_windows = 0.1
    assert (y != 0).mean() == pytest.approx(SPEC.scarce_anomaly_rate, abs=0.02)
    kinds = set(np.concatenate([y for _, y in ordinary]).tolist()) - {0}
    assert kinds == set(range(1, len(FAULT_KINDS) + 1))


def test_nodes_are_similar_but_not_identical():
    cat = catalogue(SPEC)
    unit = np.concatenate([cat.scale, cat.scale])  # physical units -> fractions of range
    scaled = []
    for k in range(4):
        X, y = node_windows(SPEC, k, cat)
        scaled.append(np.median(X[y == 0], axis=0) / unit)
    for other in scaled[1:]:
        assert np.corrcoef(scaled[0], other)[0, 1] > 0.8
        assert np.max(np.abs(scaled[0] - other)) > 0.02


@pytest.mark.parametrize("kind,metric,direction", [
    ("mem_leak", "swap", +1),
    ("thermal", "temp", +1),
    ("slow_node", "cpu_freq", -1),
    ("net_contention", "net_errs", +1),
])
def test_faults_move_the_metrics_they_should(kind, metric, direction):
    cat = catalogue(SPEC)
    cols = cat.index(metric)  # the *_mean columns
    normal, faulty = [], []
    for k in range(8):
        X, y = node_windows(SPEC, k, cat)
        normal.append(X[y == 0][:, cols].mean())
        sel = y == FAULT_KINDS.index(kind) + 1
        if sel.any():
            faulty.append(X[sel][:, cols].mean())
    assert faulty, f"no {kind} windows generated"
    assert direction * (np.mean(faulty) - np.mean(normal)) > 0


def test_spec_validation():
    with pytest.raises(ValueError, match="even"):
        ClusterSpec(features=461)
    with pytest.raises(ValueError, match="anomaly_rate"):
        ClusterSpec(anomaly_rate=1.5)
    with pytest.raises(ValueError, match="at least"):
        ClusterSpec(nodes=0)
    with pytest.raises(ValueError, match="outside"):
        node_windows(SPEC, 10)
