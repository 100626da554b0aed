"""The node's window store: SQLite in WAL mode, with retention and labels.

Theory of operation
-------------------
Every closed window is one row, committed before anything else happens to it
(scoring, metrics), with ``synchronous=FULL``: a window the collector has
closed survives a ``kill -9`` or a power cut. At most one window closes per
window length (15 min by default), so durability costs nothing measurable.

Labels play the part of the seed's Nagios annotations. An operator or a
script labels a *time range* (``shoal telemetry label anomalous --from ...
--to ...``); the range is kept in its own table, applied to the windows
already stored that overlap it, and to windows that close later inside it
(so a fault injector can label the minute it is about to disturb). When
ranges overlap, the most recent label wins. The label ``normal`` marks a
window fit for training; unlabelled windows are *assumed* normal (the seed's
semi-supervised setting: most data is normal); any other label keeps a
window out of training.

Retention: at most ``max_windows`` rows; the oldest are deleted as new ones
arrive. Label ranges that end before the oldest kept window are deleted too.

Features are stored as a msgpack map per row, so windows with different
metric sets (a sensor that vanished) coexist.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import msgpack

from shoal.core.telemetry.windows import Window

NORMAL = "normal"
# A label is a short token: it ends up in `status` output and logs.
MAX_LABEL_LEN = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    start REAL PRIMARY KEY,
    end REAL NOT NULL,
    n_samples INTEGER NOT NULL,
    features BLOB NOT NULL,
    label TEXT,
    score REAL,
    anomalous INTEGER,
    model TEXT
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    start REAL NOT NULL,
    end REAL NOT NULL,
    label TEXT
);
"""


@dataclass(frozen=True, slots=True)
class StoredWindow:
    start: float
    end: float
    n_samples: int
    features: dict[str, float]
    label: str | None
    score: float | None
    anomalous: bool | None
    model: str | None


def check_label(label: str | None) -> str | None:
    if label is None or label == "":
        return None
    if len(label) > MAX_LABEL_LEN or not all(c.isalnum() or c in "-_." for c in label):
        raise ValueError(f"a label is 1..{MAX_LABEL_LEN} characters of letters, digits, '-', '_' and '.'")
    return label


class WindowStore:
    def __init__(self, path: Path, max_windows: int = 100_000) -> None:
        self.path = Path(path)
        self.max_windows = max_windows
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writing -----------------------------------------------------------------

    def add(self, w: Window) -> str | None:
        """Store a closed window (idempotent on its start); return its label."""
        label = self._label_for(w.start, w.end)
        blob = msgpack.packb(w.features)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO windows (start, end, n_samples, features, label) VALUES (?, ?, ?, ?, ?)",
                (w.start, w.end, w.n_samples, blob, label),
            )
            self._retain()
        return label

    def _retain(self) -> None:
        (n,) = self.db.execute("SELECT COUNT(*) FROM windows").fetchone()
        if n > self.max_windows:
            self.db.execute(
                "DELETE FROM windows WHERE start IN (SELECT start FROM windows ORDER BY start LIMIT ?)",
                (n - self.max_windows,),
            )
            (oldest,) = self.db.execute("SELECT MIN(start) FROM windows").fetchone()
            self.db.execute("DELETE FROM labels WHERE end <= ?", (oldest,))

    def _label_for(self, start: float, end: float) -> str | None:
        row = self.db.execute(
            "SELECT label FROM labels WHERE start < ? AND end > ? ORDER BY id DESC LIMIT 1", (end, start)
        ).fetchone()
        return row[0] if row else None

    def label(self, start: float, end: float, label: str | None) -> int:
        """Label the range [start, end) now and for windows closing later; return rows changed."""
        label = check_label(label)
        if not end > start:
            raise ValueError("the label range must end after it starts")
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO labels (start, end, label) VALUES (?, ?, ?)", (start, end, label))
            cur = self.db.execute("UPDATE windows SET label = ? WHERE start < ? AND end > ?", (label, end, start))
        return cur.rowcount

    def set_score(self, start: float, score: float, anomalous: bool, model: str) -> None:
        self.db.execute(
            "UPDATE windows SET score = ?, anomalous = ?, model = ? WHERE start = ?",
            (score, int(anomalous), model, start),
        )

    # -- reading -----------------------------------------------------------------

    def _row(self, r) -> StoredWindow:
        return StoredWindow(r[0], r[1], r[2], msgpack.unpackb(r[3]), r[4], r[5],
                            None if r[6] is None else bool(r[6]), r[7])

    def recent(self, n: int) -> list[StoredWindow]:
        rows = self.db.execute(
            "SELECT start, end, n_samples, features, label, score, anomalous, model FROM windows "
            "ORDER BY start DESC LIMIT ?", (n,)
        ).fetchall()
        return [self._row(r) for r in rows]

    def training(self, limit: int | None = None) -> list[StoredWindow]:
        """Windows labelled normal or not labelled, oldest first (at most ``limit``, newest kept)."""
        rows = self.db.execute(
            "SELECT start, end, n_samples, features, label, score, anomalous, model FROM windows "
            "WHERE label IS NULL OR label = ? ORDER BY start DESC LIMIT ?", (NORMAL, limit or -1)
        ).fetchall()
        return [self._row(r) for r in reversed(rows)]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]

    def starts(self) -> list[float]:
        return [r[0] for r in self.db.execute("SELECT start FROM windows ORDER BY start")]
