"""The dispatcher's durable job store: SQLite in WAL mode.

Theory of operation
-------------------
What must survive ``kill -9`` is written here before the dispatcher answers:

* a submission is one transaction (the job row with its normalised spec, one
  row per unit and per task); the job id is only returned after the commit,
  so an acknowledged job is never lost;
* a unit's completion is one conditional update,
  ``UPDATE units SET state='done' WHERE ... AND state='pending'``; only when
  it changes a row are the task results written and a row appended to the
  ``completions`` log. A second report of the same unit (at-least-once
  execution: the lease expired and the unit ran again elsewhere, or the
  dispatcher restarted and re-dispatched it) changes nothing. So each unit is
  recorded done exactly once, and the log lets anyone check that;
* failed attempts and final failures are counted in ``units.attempts``.

Leases and per-worker queues are soft state in memory (:mod:`shoal.core.dispatch.machine`): after a
restart every unit that is not done is pending again and is dispatched anew.
Completions arrive in batches from workers and are written in one transaction
per batch, which is what makes thousands of tiny tasks per second possible.

``synchronous=NORMAL`` in WAL mode: a commit is in the WAL (the OS page cache)
before we answer, so killing the process loses nothing; a power cut may lose
the last transactions. ``durability = "full"`` in the config fsyncs every
commit instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from shoal.core.dispatch.jobs import Job, job_from_dict
from shoal.core.dispatch.lifecycle import CANCELLED, DONE, FAILED, PENDING, RETRY
from shoal.core.dispatch.machine import StoredJob
from shoal.protocol.dispatch import KILLED, TaskResult

__all__ = ["Store", "StoredJob", "TaskResult"]

# The schema spells the state names out; they are the life cycle's (core/dispatch/lifecycle.py).
assert (PENDING, DONE, FAILED, CANCELLED) == ("pending", "done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec BLOB NOT NULL,           -- msgpack of Job.to_dict()
    policy TEXT NOT NULL,
    submitted REAL NOT NULL,      -- wall-clock seconds
    state TEXT NOT NULL,          -- running, done, failed, cancelled
    finished REAL,
    submitted_by TEXT NOT NULL DEFAULT '',  -- a user name, "uid N", or "token"; '' before it was recorded
    reason TEXT NOT NULL DEFAULT '',        -- why a failed or cancelled job ended
    -- task counts, kept with every write so that listing jobs costs nothing per task
    n_tasks INTEGER NOT NULL DEFAULT 0,
    n_done INTEGER NOT NULL DEFAULT 0,
    n_failed INTEGER NOT NULL DEFAULT 0,
    n_cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS units (
    job INTEGER NOT NULL,
    unit TEXT NOT NULL,
    state TEXT NOT NULL,          -- pending, done, failed, cancelled
    attempts INTEGER NOT NULL DEFAULT 0,  -- runs reported (failures count against retries)
    lost INTEGER NOT NULL DEFAULT 0,      -- leases lost (worker dead, lease expired): runs never reported
    PRIMARY KEY (job, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    job INTEGER NOT NULL,
    task TEXT NOT NULL,
    unit TEXT NOT NULL,
    state TEXT NOT NULL,          -- pending, done, failed, cancelled
    exit_code INTEGER,
    worker TEXT,
    started REAL,
    finished REAL,
    error TEXT,
    stdout BLOB,
    stderr BLOB,
    outputs BLOB,                 -- msgpack [[path, size, sha256hex], ...]
    source BLOB,                  -- msgpack {url, secret, magnets}: where the outputs are published
    PRIMARY KEY (job, task)       -- rowid order is the job's topological order
);
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    unit TEXT NOT NULL,
    worker TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""


COUNTS = ("n_tasks", "n_done", "n_failed", "n_cancelled")
PRUNE_ROWS = 20_000  # rows one prune transaction deletes at most (the dispatcher serves in between)


class Store:
    def __init__(self, path: Path, *, durability: str = "normal") -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an older dispatcher up to this schema (each step once)."""
        cols = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "submitted_by" not in cols:  # jobs submitted before submissions were authenticated
            self.db.execute("ALTER TABLE jobs ADD COLUMN submitted_by TEXT NOT NULL DEFAULT ''")
        if "reason" not in cols:  # before jobs could be cancelled
            self.db.execute("ALTER TABLE jobs ADD COLUMN reason TEXT NOT NULL DEFAULT ''")
        if "n_tasks" not in cols:  # before the counts were kept: count once
            with self._tx() as db:
                for c in COUNTS:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE jobs SET n_tasks=(SELECT count(*) FROM tasks t WHERE t.job=jobs.id), "
                           "n_done=(SELECT count(*) FROM tasks t WHERE t.job=jobs.id AND t.state='done'), "
                           "n_failed=(SELECT count(*) FROM tasks t WHERE t.job=jobs.id AND t.state='failed'), "
                           "n_cancelled=(SELECT count(*) FROM tasks t WHERE t.job=jobs.id AND t.state='cancelled')")
        if "lost" not in {row[1] for row in self.db.execute("PRAGMA table_info(units)")}:
            self.db.execute("ALTER TABLE units ADD COLUMN lost INTEGER NOT NULL DEFAULT 0")
        if "source" not in {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}:
            self.db.execute("ALTER TABLE tasks ADD COLUMN source BLOB")

    def close(self) -> None:
        self.db.close()

    # -- writes ----------------------------------------------------------------

    def add_job(self, job: Job, policy: str, submitted: float, submitted_by: str = "") -> int:
        spec = msgpack.packb(job.to_dict(), use_bin_type=True)
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (name, spec, policy, submitted, state, submitted_by) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                (job.name, spec, policy, submitted, submitted_by),
            )
            job_id = cur.lastrowid
            assert job_id is not None  # an INSERT always sets it
            db.executemany("INSERT INTO units (job, unit, state) VALUES (?, ?, 'pending')",
                           [(job_id, u) for u in job.units])
            db.executemany(
                "INSERT INTO tasks (job, task, unit, state) VALUES (?, ?, ?, 'pending')",
                [(job_id, t, u.id) for u in job.units.values() for t in u.tasks],
            )
            db.execute("UPDATE jobs SET n_tasks=? WHERE id=?", (len(job.tasks), job_id))
        return job_id

    def record(self, outcomes: Sequence[tuple[int, str, str, str, Sequence[TaskResult]]], now: float) -> list[bool]:
        """Write a batch of unit outcomes ``(job, unit, worker, state, results)``.

        ``state`` is ``done``, ``failed`` (final) or ``retry`` (the life cycle's
        event: attempts + 1, still pending). Returns, per outcome, whether it changed anything: a
        unit already done or failed is left alone (idempotent completion).
        """
        changed: list[bool] = []
        counts: dict[int, list[int]] = {}  # job -> [done, failed] tasks written
        with self._tx() as db:
            for job, unit, worker, state, results in outcomes:
                if state == RETRY:
                    cur = db.execute(
                        "UPDATE units SET attempts = attempts + 1 WHERE job=? AND unit=? AND state='pending'",
                        (job, unit))
                    changed.append(cur.rowcount == 1)
                    continue
                cur = db.execute(
                    "UPDATE units SET state=?, attempts = attempts + 1 WHERE job=? AND unit=? AND state='pending'",
                    (state, job, unit),
                )
                if cur.rowcount != 1:
                    changed.append(False)
                    continue
                changed.append(True)
                if state == DONE:
                    db.execute("INSERT INTO completions (job, unit, worker, at) VALUES (?, ?, ?, ?)",
                               (job, unit, worker, now))
                c = counts.setdefault(job, [0, 0])
                for r in results:
                    c[0 if r.ok else 1] += 1
                    db.execute(
                        "UPDATE tasks SET state=?, exit_code=?, worker=?, started=?, finished=?, error=?, "
                        "stdout=?, stderr=?, outputs=?, source=? WHERE job=? AND task=?",
                        (DONE if r.ok else FAILED, r.exit_code, worker, r.started, r.finished, r.error,
                         r.stdout, r.stderr, msgpack.packb(r.outputs or [], use_bin_type=True),
                         None if r.source is None else msgpack.packb(r.source, use_bin_type=True), job, r.task),
                    )
            db.executemany("UPDATE jobs SET n_done = n_done + ?, n_failed = n_failed + ? WHERE id=?",
                           [(d, f, job) for job, (d, f) in counts.items()])
        return changed

    def finish_job(self, job: int, state: str, now: float, cancel_units: Iterable[str] = (), reason: str = "",
                   leased: dict[str, str] | None = None) -> None:
        """The job's final state; its open units are cancelled, each task saying why: ``reason``,
        and for a unit leased to a worker, which one (it is killed there; its kill report, if
        it had started, fills in the run: :meth:`record_late`)."""
        units = list(cancel_units)
        leased = leased or {}
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, finished=?, reason=? WHERE id=?", (state, now, reason, job))
            if units:
                db.executemany("UPDATE units SET state='cancelled' WHERE job=? AND unit=? AND state='pending'",
                               [(job, u) for u in units])
                db.executemany(
                    "UPDATE tasks SET error=?, worker=? WHERE job=? AND unit=? AND state='pending'",
                    [(f"{reason}; it was leased to {w}", w, job, u) for u, w in leased.items()])
                cur = db.execute("UPDATE tasks SET state='cancelled', error=coalesce(error, ?) "
                                 "WHERE job=? AND state='pending'", (f"{reason}; not started" if reason else None, job))
                db.execute("UPDATE jobs SET n_cancelled = n_cancelled + ? WHERE id=?", (cur.rowcount, job))

    def record_late(self, rows: Sequence[tuple[int, str, list[TaskResult]]], worker: str, now: float) -> int:
        """A worker's report of units whose job had ended: only a cancelled unit's run is written
        (once: tasks not yet filled in), a task killed by the worker as ``cancelled``; returns
        how many units it changed. Anything else (a duplicate of a recorded unit) is left alone."""
        changed = 0
        with self._tx() as db:
            for job, unit, results in rows:
                got = db.execute("SELECT u.state, j.reason FROM units u JOIN jobs j ON j.id = u.job "
                                 "WHERE u.job=? AND u.unit=?", (job, unit)).fetchone()
                if got is None or got[0] != CANCELLED:
                    continue
                reason = got[1]
                n = 0
                for r in results:
                    if r.ok:
                        state, error = DONE, ""
                    elif r.error == KILLED:
                        state, error = CANCELLED, f"killed on {worker}: {reason or 'its job ended'}"
                    else:
                        state, error = FAILED, r.error
                    cur = db.execute(
                        "UPDATE tasks SET state=?, exit_code=?, worker=?, started=?, finished=?, error=?, "
                        "stdout=?, stderr=?, outputs=? "
                        "WHERE job=? AND unit=? AND task=? AND state='cancelled' AND started IS NULL",
                        (state, r.exit_code, worker, r.started, r.finished, error, r.stdout, r.stderr,
                         msgpack.packb(r.outputs or [], use_bin_type=True), job, unit, r.task))
                    n += cur.rowcount
                    if cur.rowcount and state != CANCELLED:
                        col = "n_done" if state == DONE else "n_failed"
                        db.execute(f"UPDATE jobs SET n_cancelled = n_cancelled - 1, {col} = {col} + 1 WHERE id=?",
                                   (job,))
                if n:
                    db.execute("UPDATE units SET attempts = attempts + 1 WHERE job=? AND unit=?", (job, unit))
                    changed += 1
        return changed

    def lost_lease(self, units: Sequence[tuple[int, str]]) -> None:
        """Leases taken back from dead or silent workers: the unit's next run is a later attempt."""
        with self._tx() as db:
            db.executemany("UPDATE units SET lost = lost + 1 WHERE job=? AND unit=?", units)

    # -- reads -----------------------------------------------------------------

    def unfinished_jobs(self) -> list[StoredJob]:
        """Every job still running, with its units' states (for a restart)."""
        out = []
        for job_id, spec, policy, submitted, state in self.db.execute(
            "SELECT id, spec, policy, submitted, state FROM jobs WHERE state='running' ORDER BY id"
        ).fetchall():
            job = job_from_dict(msgpack.unpackb(spec, raw=False), _NO_LIMITS)
            rows = self.db.execute("SELECT unit, state, attempts, lost FROM units WHERE job=?", (job_id,)).fetchall()
            out.append(StoredJob(job_id, job, policy, submitted, state, {u: s for u, s, _a, _l in rows},
                                 {u: a for u, _s, a, _l in rows}, {u: lost for u, _s, _a, lost in rows if lost}))
        return out

    def jobs(self, limit: int = 50, before: int | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs with ids below ``before`` (a page), in ``state`` if given."""
        rows = self.db.execute(
            "SELECT j.id, j.name, j.policy, j.state, j.submitted, j.finished, j.submitted_by, "
            "j.n_tasks, j.n_done, j.n_failed "
            "FROM jobs j WHERE j.id < ? AND (? IS NULL OR j.state = ?) ORDER BY j.id DESC LIMIT ?",
            (1 << 62 if before is None else before, state, state, limit)).fetchall()
        keys = ("id", "name", "policy", "state", "submitted", "finished", "submitted_by", "tasks", "done", "failed")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def job(self, job_id: int, *, logs: bool = False, offset: int = 0, limit: int = 1000,
            budget: int = 1 << 62, states: Sequence[str] = ()) -> dict[str, Any] | None:
        """One job: its row, task counts by state, and up to ``limit`` tasks from ``offset`` in
        topological order (of those in ``states``, if given: ``matching`` counts them), fewer if
        their logs would pass ``budget`` bytes (at least one)."""
        row = self.db.execute("SELECT id, name, policy, state, submitted, finished, submitted_by, reason, "
                              "n_tasks, n_done, n_failed, n_cancelled FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        out = dict(zip(("id", "name", "policy", "state", "submitted", "finished", "submitted_by", "reason"), row[:8],
                       strict=True))
        total, done, failed, cancelled = row[8:]
        counts = {PENDING: total - done - failed - cancelled, DONE: done, FAILED: failed, CANCELLED: cancelled}
        out["counts"] = {st: n for st, n in counts.items() if n}  # the kept counts: no scan of the tasks
        out["total"] = total
        out["matching"] = sum(n for st, n in out["counts"].items() if st in states) if states else out["total"]
        out["offset"] = offset
        cols = "task, unit, state, exit_code, worker, started, finished, error, outputs"
        if logs:
            cols += ", stdout, stderr"
        tasks: list[dict[str, Any]] = []
        size = 0
        where = f" AND state IN ({', '.join('?' * len(states))})" if states else ""
        for r in self.db.execute(f"SELECT {cols} FROM tasks WHERE job=?{where} ORDER BY rowid LIMIT ? OFFSET ?",  # noqa: S608 - placeholders only
                                 (job_id, *states, limit, offset)):
            d = dict(zip(("task", "unit", "state", "exit_code", "worker", "started", "finished", "error",
                          "outputs", "stdout", "stderr"), r, strict=False))  # stdout, stderr only with logs
            size += len(d.get("stdout") or b"") + len(d.get("stderr") or b"") + len(d["outputs"] or b"")
            if tasks and size > budget:
                break
            d["outputs"] = msgpack.unpackb(d["outputs"], raw=False) if d["outputs"] else []
            tasks.append(d)
        units = {d["unit"] for d in tasks}
        attempts = {u: (a, lost) for u, a, lost in
                    self.db.execute("SELECT unit, attempts, lost FROM units WHERE job=?", (job_id,)) if u in units}
        for d in tasks:
            a, lost = attempts.get(d["unit"], (0, 0))
            d["attempts"] = a + lost  # runs started, as far as anyone knows
            d["lost"] = lost
        out["tasks"] = tasks
        return out

    def task_outputs(self, job_id: int, task: str) -> tuple[list[list[Any]], dict[str, Any] | None]:
        """A done task's recorded outputs ``[[path, size, sha256], ...]`` and where they are published."""
        row = self.db.execute("SELECT outputs, source FROM tasks WHERE job=? AND task=? AND state='done'",
                              (job_id, task)).fetchone()
        if row is None:
            return [], None
        outputs, source = row
        return (msgpack.unpackb(outputs, raw=False) if outputs else [],
                msgpack.unpackb(source, raw=False) if source else None)

    def prune(self, before: float, budget: int = PRUNE_ROWS) -> int:
        """Delete finished jobs that finished before ``before``, oldest first, at most about
        ``budget`` rows in one transaction (a big job goes over several calls); returns the
        rows deleted. A job's row goes last, so a job is listed until it is wholly gone."""
        deleted = 0
        with self._tx() as db:
            for (job,) in db.execute("SELECT id FROM jobs WHERE state != 'running' AND finished < ? ORDER BY id",
                                     (before,)).fetchall():
                for table, key in (("tasks", "rowid"), ("units", "unit"), ("completions", "seq")):
                    cur = db.execute(f"DELETE FROM {table} WHERE job=? AND {key} IN "  # noqa: S608 - fixed names
                                     f"(SELECT {key} FROM {table} WHERE job=? LIMIT ?)", (job, job, budget - deleted))
                    deleted += cur.rowcount
                    if deleted >= budget:
                        return deleted
                deleted += db.execute("DELETE FROM jobs WHERE id=?", (job,)).rowcount
                if deleted >= budget:
                    return deleted
        return deleted

    def completion_counts(self, job_id: int) -> dict[str, int]:
        """How many times each unit of a job was recorded done (each must be 1)."""
        return dict(self.db.execute("SELECT unit, count(*) FROM completions WHERE job=? GROUP BY unit",
                                    (job_id,)).fetchall())

    # -- helpers ---------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


class _Unlimited:
    max_spec_bytes = 1 << 62
    max_tasks = 1 << 62


# A stored spec was validated when it was accepted; limits lowered since must
# not make it unreadable.
_NO_LIMITS: Any = _Unlimited()
