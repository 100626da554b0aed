"""The SQLite window store: durability, labels, retention, training selection."""

from __future__ import annotations

import pytest

from shoal.core.telemetry.windows import Window
from shoal.daemons.telemetry.store import WindowStore


def win(start, x=1.0):
    return Window(start, start + 10.0, 10, {"x:mean": x, "x:std": 0.1})


def test_windows_round_trip_and_survive_reopen(tmp_path):
    s = WindowStore(tmp_path / "w.db")
    s.add(win(0.0, 1.5))
    s.add(win(10.0, 2.5))
    s.set_score(10.0, 0.02, True, "m1")
    s.close()
    s = WindowStore(tmp_path / "w.db")
    (newest, oldest) = s.recent(5)
    assert newest.start == 10.0 and newest.features == {"x:mean": 2.5, "x:std": 0.1}
    assert newest.score == 0.02 and newest.anomalous is True and newest.model == "m1"
    assert oldest.score is None and oldest.anomalous is None
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_labels_apply_to_stored_and_future_windows_latest_wins(tmp_path):
    s = WindowStore(tmp_path / "w.db")
    s.add(win(0.0))
    s.add(win(10.0))
    assert s.label(5.0, 25.0, "cpu-hog") == 2  # overlaps both stored windows
    assert s.add(win(20.0)) == "cpu-hog"  # closes later inside the range
    assert s.add(win(30.0)) is None
    assert s.label(0.0, 10.0, "normal") == 1
    labels = {w.start: w.label for w in s.recent(10)}
    assert labels == {0.0: "normal", 10.0: "cpu-hog", 20.0: "cpu-hog", 30.0: None}
    assert [w.start for w in s.training()] == [0.0, 30.0]  # normal or unlabelled
    assert s.label(10.0, 20.0, "") == 1  # clearing a label
    assert [w.start for w in s.training()] == [0.0, 10.0, 30.0]


@pytest.mark.parametrize("bad", ["a b", "x" * 65, "semi;colon"])
def test_bad_labels_are_refused(tmp_path, bad):
    s = WindowStore(tmp_path / "w.db")
    with pytest.raises(ValueError):
        s.label(0.0, 10.0, bad)
    with pytest.raises(ValueError):
        s.label(10.0, 0.0, "ok")


def test_retention_keeps_the_newest(tmp_path):
    s = WindowStore(tmp_path / "w.db", max_windows=3)
    s.label(0.0, 10.0, "old")
    for i in range(5):
        s.add(win(i * 10.0))
    assert s.starts() == [20.0, 30.0, 40.0]
    assert s.db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 0
    assert [w.start for w in s.training(limit=2)] == [30.0, 40.0]
