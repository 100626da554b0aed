"""A dispatch unit's life cycle: one transition table, one checked move (h11 ``_state.py`` style).

Theory of operation
-------------------
A *unit* (a task, or a fused chain of tasks, see :mod:`.jobs`) is in one of
the :data:`STATES`; an *event* moves it to another, and only the moves in
:data:`TRANSITIONS` exist::

    waiting --RELEASE (deps done)--> ready --ASSIGN (policy.choose)--> assigned --LEASE (pull)--> leased
    assigned/leased --REQUEUE (worker silent, lease expired, worker excluded)--> ready
    any open state --SUCCEED--> done | --RETRY--> ready | --FAIL--> failed | --CANCEL--> cancelled

A report is accepted for a unit in any open state, not only ``leased``:
execution is at-least-once, so the first worker's result may arrive after
its lease expired and the unit was queued again elsewhere; whichever result
the store records first wins.

:func:`move` is the only way a unit's state changes; an event not allowed in
the current state raises :class:`IllegalTransition` (a bug in the caller).

The durable store keeps the same names for the final states and one more,
:data:`PENDING`, for "not final" (the soft states waiting/ready/assigned/leased
are rebuilt after a restart).
"""

from __future__ import annotations

__all__ = [
    "WAITING", "READY", "ASSIGNED", "LEASED", "DONE", "FAILED", "CANCELLED",
    "STATES", "OPEN", "FINAL", "PENDING", "STORED",
    "RELEASE", "ASSIGN", "LEASE", "REQUEUE", "SUCCEED", "RETRY", "FAIL", "CANCEL", "EVENTS",
    "TRANSITIONS", "IllegalTransition", "move",
]

WAITING, READY, ASSIGNED, LEASED = "waiting", "ready", "assigned", "leased"
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
OPEN = (WAITING, READY, ASSIGNED, LEASED)
FINAL = (DONE, FAILED, CANCELLED)
STATES = OPEN + FINAL

#: the store's name for every open state
PENDING = "pending"
#: the states a unit (and a task) has in the store
STORED = (PENDING, *FINAL)

RELEASE, ASSIGN, LEASE, REQUEUE = "release", "assign", "lease", "requeue"
SUCCEED, RETRY, FAIL, CANCEL = "succeed", "retry", "fail", "cancel"
EVENTS = (RELEASE, ASSIGN, LEASE, REQUEUE, SUCCEED, RETRY, FAIL, CANCEL)

TRANSITIONS: dict[tuple[str, str], str] = {
    (WAITING, RELEASE): READY,
    (READY, ASSIGN): ASSIGNED,
    (ASSIGNED, LEASE): LEASED,
    (ASSIGNED, REQUEUE): READY,
    (LEASED, REQUEUE): READY,
    **{(s, SUCCEED): DONE for s in OPEN},
    **{(s, RETRY): READY for s in OPEN},
    **{(s, FAIL): FAILED for s in OPEN},
    **{(s, CANCEL): CANCELLED for s in OPEN},
}


class IllegalTransition(RuntimeError):
    """An event the unit's current state does not allow (a bug in the caller)."""


def move(state: str, event: str) -> str:
    """The state after ``event`` in ``state``; raise :class:`IllegalTransition` if there is none."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"a unit in state {state!r} cannot {event}") from None


def stored_state(state: str) -> str:
    """The store's name for ``state``."""
    return state if state in FINAL else PENDING
