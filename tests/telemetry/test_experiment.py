"""The experiment protocol: split, metrics, FedAvg aggregation, a tiny end-to-end run."""

from __future__ import annotations

import argparse
import io
import json
import xml.etree.ElementTree as ET
from fractions import Fraction

import numpy as np
import pytest

from shoal.lab import telemetry_experiment as ex


def test_split_moves_anomalies_from_train_to_test():
    X = np.arange(1000, dtype=np.float32).reshape(-1, 1)  # row id as the only feature
    y = np.zeros(1000, np.int8)
    y[::25] = 3  # 40 anomalies
    train, test, test_y = ex.split_node(X, y, np.random.default_rng(0), 0.2)
    ids_train, ids_test = train[:, 0].astype(int), test[:, 0].astype(int)
    assert (y[ids_train] == 0).all()
    assert sorted(ids_train.tolist() + ids_test.tolist()) == list(range(1000))  # a partition
    assert test_y.sum() == 40 and (test_y == (y[ids_test] != 0)).all()
    # 200 random test rows plus the anomalies that fell into the 800 training rows.
    anomalies_in_random_test = int(np.sum(test_y[:200]))
    assert test.shape[0] == 200 + (40 - anomalies_in_random_test)


def test_subsample_sizes():
    rng = np.random.default_rng(0)
    idx = ex.subsample(1000, Fraction(1, 16), rng)
    assert len(idx) == 63 and len(set(idx.tolist())) == 63  # ceil(62.5)
    assert len(ex.subsample(1000, Fraction(1), rng)) == 1000
    assert len(ex.subsample(5, Fraction(1, 16), rng)) == 1


def test_confusion_metrics_by_hand():
    y_true = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    m = ex.confusion(y_true, y_pred)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 6, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["tnr"] == pytest.approx(6 / 7)
    assert m["fpr"] == pytest.approx(1 / 7)
    silent = ex.confusion([1, 0], [0, 0])
    assert silent["precision"] == 0.0 and silent["f1"] == 0.0 and silent["tnr"] == 1.0


def test_fedavg_is_the_sample_weighted_mean():
    a = [np.array([[1.0, 2.0]], np.float32), np.array([0.0], np.float32)]
    b = [np.array([[3.0, 6.0]], np.float32), np.array([4.0], np.float32)]
    c = [np.array([[5.0, -2.0]], np.float32), np.array([8.0], np.float32)]
    out = ex.fedavg([(a, 10), (b, 30), (c, 60)])
    # Eq. 1: sum_k n_k / n * w_k with n = 100
    np.testing.assert_allclose(out[0], [[0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 6 - 0.6 * 2]])
    np.testing.assert_allclose(out[1], [0.3 * 4 + 0.6 * 8])
    assert all(w.dtype == np.float32 for w in out)
    with pytest.raises(ValueError):
        ex.fedavg([])


def test_parse_fraction():
    assert ex.parse_fraction("1/16") == Fraction(1, 16)
    assert ex.parse_fraction("0.25") == Fraction(1, 4)
    for bad in ("0", "2", "1/0", "x"):
        with pytest.raises(ValueError, match="fraction"):
            ex.parse_fraction(bad)


TINY = ex.ExperimentConfig(nodes=4, features=24, windows=400, epochs=2, rounds=2,
                           batch_size=32, lr=3e-3, fractions=("1", "1/4"), seed=1,
                           hidden=(16, 8, 4, 8, 16))


def test_tiny_experiment_end_to_end():
    lines = []
    doc = ex.run_experiment(TINY, lines.append)
    assert any("fraction" in line for line in lines)
    assert [r["fraction"] for r in doc["results"]] == ["1", "1/4"]
    full, quarter = doc["results"]
    assert (full["epochs"], full["rounds"]) == (2, 2)
    assert (quarter["epochs"], quarter["rounds"]) == (8, 8)  # budget "work": x 1/fraction
    for r in doc["results"]:
        for meth in ("ae", "fl"):
            assert set(r[meth]) == set(ex.METRICS)
            for stats in r[meth].values():
                assert 0.0 <= stats["mean"] <= 1.0 and stats["std"] >= 0.0
        assert len(r["per_node"]) == 4
        assert len(r["fl_round_losses"]) == r["rounds"]
        # The scarce node (last, 10% of the windows) trains on fewer windows.
        assert r["per_node"][3]["scarce"] and r["per_node"][3]["train"] < r["per_node"][0]["train"]
        # Recall + FNR bookkeeping: every test anomaly is a TP or an FN.
        for p in r["per_node"]:
            for meth in ("ae", "fl"):
                assert p[meth]["tp"] + p[meth]["fn"] == p["anomalies"]
                assert sum(p[meth][k] for k in ("tp", "fp", "tn", "fn")) == p["test"]
    assert quarter["per_node"][0]["train"] == pytest.approx(full["per_node"][0]["train"] / 4, abs=1)
    # The same test sets in every row of the table.
    assert [p["test"] for p in full["per_node"]] == [p["test"] for p in quarter["per_node"]]
    json.dumps(doc)  # JSON-ready
    table = ex.format_table(doc)
    header = table.splitlines()[0].split()
    assert header == ["data", "Prec.-AE", "Prec.-FL", "Recall-AE", "Recall-FL", "F1-AE",
                      "F1-FL", "TNR-AE", "TNR-FL", "FPR-AE", "FPR-FL"]
    assert len(table.splitlines()) == 3
    assert "fedavg_f1_at_least_0.84" in doc["targets"]


def test_fedavg_training_reduces_the_federated_loss():
    doc = ex.run_experiment(ex.ExperimentConfig(**{**TINY.__dict__, "rounds": 4,
                                                   "fractions": ("1",)}))
    losses = doc["results"][0]["fl_round_losses"]
    assert losses[-1] < losses[0]


def _args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    ex.add_arguments(parser)
    argv = ["--nodes", "3", "--features", "16", "--windows", "200", "--epochs", "1",
            "--rounds", "1", "--fractions", "1,1/2", "--out", str(tmp_path), "--quiet"]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return parser.parse_args(argv)


def test_cli_runner_writes_json_and_svg(tmp_path):
    out = io.StringIO()
    assert ex.run(_args(tmp_path), out) == 0
    text = out.getvalue()
    assert "F1-FL" in text and "wrote" in text
    doc = json.loads((tmp_path / "experiment.json").read_text())
    assert doc["config"]["nodes"] == 3 and doc["config"]["fractions"] == ["1", "1/2"]
    svg = ET.parse(tmp_path / "f1_improvement.svg").getroot()
    bars = [el for el in svg.iter("{http://www.w3.org/2000/svg}g") if el.get("id", "").startswith("f1-bin-")]
    assert len(bars) == 20  # 20 bins over [-1, 1]
    assert (tmp_path / "f1_improvement.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    _, edges, counts = ex.improvement_histogram(doc)
    assert len(counts) == 20 and edges[0] == -1.0 and edges[-1] == 1.0
    assert sum(counts) == 3  # one per node


@pytest.mark.parametrize("opt,value,msg", [
    ("fractions", "1,0", "fraction"),
    ("features", "15", "even"),
    ("nodes", "0", "--nodes"),
    ("lr", "0", "--lr"),
    ("percentile", "120", "--percentile"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, opt, value, msg):
    assert ex.run(_args(tmp_path, **{opt: value}), io.StringIO()) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "experiment.json").exists()
