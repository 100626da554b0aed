"""Dispatch and queue policies: the registry, and the interface re-exported from :mod:`.base`.

The interface (``DispatchPolicy``, ``QueuePolicy``, ``ServerState``,
``TaskInfo``, the cost model) is in :mod:`shoal.core.dispatch.base`, which the
policy modules import; this module builds policies by name. Unknown names raise
:class:`ValueError` with the list of known names, so the CLI and config loader
can show a one-line error.
"""

from __future__ import annotations

from typing import Any

from shoal.core.dispatch import classic, dqn, schedulers
from shoal.core.dispatch.base import (
    DISPATCH_POLICIES,
    QUEUE_POLICIES,
    DispatchPolicy,
    QueuePolicy,
    ServerState,
    TaskInfo,
    admissible,
    estimated_wait,
    processing_time,
    reward,
    transfer_delay,
)

__all__ = [
    "DISPATCH_POLICIES",
    "QUEUE_POLICIES",
    "DispatchPolicy",
    "QueuePolicy",
    "ServerState",
    "TaskInfo",
    "admissible",
    "estimated_wait",
    "make_dispatch_policy",
    "make_queue_policy",
    "processing_time",
    "reward",
    "transfer_delay",
]


# --------------------------------------------------------------------------- registry


def make_dispatch_policy(name: str, *, seed: int = 0, **options: Any) -> DispatchPolicy:
    """Build a dispatch policy by name (one of :data:`DISPATCH_POLICIES`)."""
    factories = {
        "nearest": classic.Nearest,
        "random": classic.RandomDispatch,
        "least-load": classic.LeastLoad,
        "heft": classic.Heft,
        "dqn": dqn.DQNDispatch,
    }
    try:
        factory = factories[name]
    except KeyError:
        raise ValueError(
            f"unknown dispatch policy {name!r}; known: {', '.join(DISPATCH_POLICIES)}"
        ) from None
    try:
        return factory(seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for dispatch policy {name!r}: {exc}") from None


def make_queue_policy(name: str, *, seed: int = 0, **options: Any) -> QueuePolicy:
    """Build a queue (scheduling) policy by name (one of :data:`QUEUE_POLICIES`)."""
    factories = {
        "fcfs": schedulers.FCFS,
        "sjf": schedulers.SJF,
        "edf": schedulers.EDF,
        "marl": schedulers.MultiAgentScheduler,
    }
    try:
        factory = factories[name]
    except KeyError:
        raise ValueError(
            f"unknown queue policy {name!r}; known: {', '.join(QUEUE_POLICIES)}"
        ) from None
    try:
        return factory(seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for queue policy {name!r}: {exc}") from None
