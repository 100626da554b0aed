"""A failed unit holds back its job's queued units until the dispatcher has answered: a reply
that may predate that answer does not release them.

In a CI run a heartbeat sent before the failure's report was answered came back after it,
saying the job's queued unit was alive (the dispatcher had replied before it knew of the
failure), and the worker started that unit of a failed job. The hold is the worker's own
bookkeeping, so the test drives the worker's methods directly, in the order the replies came.
"""

from types import SimpleNamespace

import trio

from shoal.daemons.worker.daemon import WorkerApp


def _worker_holding_a_failure(job: int, queued: str) -> WorkerApp:
    w = WorkerApp.__new__(WorkerApp)  # the hold's state only: no dispatcher session
    w.held, w.suspect, w.answers = {job: 1}, {}, 0
    w.queue = [(SimpleNamespace(key=queued), SimpleNamespace(job=str(job)))]
    w.changed, w.beat_now = trio.Event(), trio.Event()
    return w


def test_a_heartbeat_sent_before_the_failure_was_answered_does_not_release_the_job():
    later = "7/later2/0"
    w = _worker_holding_a_failure(7, later)
    # a heartbeat goes out listing the queued unit (sent before the failure's answer) ...
    hb_sent, hb_seen = [later], w.answers
    # ... the failure's report is answered (the unit was pulled after the report's list was made)
    w._unhold(7)
    beat = w.beat_now
    w._cancel([], [], w.answers)
    assert 7 in w.suspect and beat.is_set()  # not covered: ask again at once
    # the stale heartbeat's reply: "alive", from before the dispatcher knew of the failure
    w._cancel([], hb_sent, hb_seen)
    assert 7 in w.suspect, "a reply older than the failure's answer released the job"
    # the next heartbeat, sent after the answer, is believed
    w._cancel([], [later], w.answers)
    assert 7 not in w.suspect


def test_a_report_answer_covering_the_queued_units_releases_the_job_at_once():
    later = "7/later0/0"
    w = _worker_holding_a_failure(7, later)
    w._unhold(7)
    w._cancel([], [later], w.answers)
    assert w.suspect == {} and w.held == {}
