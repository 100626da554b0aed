"""Dispatch and queue policies: the one interface (the registry is :mod:`.policy`).

Theory of operation
-------------------
Seed 004 (DAMD) splits the placement of dependent tasks into two decisions:

1. **Dispatch** (access point → server): when a task is released, pick the server
   it goes to. A :class:`DispatchPolicy` does this in :meth:`DispatchPolicy.choose`.
2. **Scheduling** (inside a server): whenever a server has a free CPU, pick which
   of its ready tasks runs next. A :class:`QueuePolicy` does this in
   :meth:`QueuePolicy.pick`.

Both are plain, sans-IO objects: no sockets, no clocks, no global RNG. Time is
passed in as ``now`` (seconds, any monotonic origin, the same origin as
``TaskInfo.submitted`` and ``TaskInfo.deadline``), randomness comes from a
``numpy.random.Generator`` seeded at construction. The same classes therefore run
in the simulator (:mod:`.sim`) and in the live dispatcher/worker daemons.

Cost model shared by all policies (seed 004, section II.B):

* external delay to reach a server: ``D1 = k + data_size / bandwidth`` where ``k``
  is the server's propagation delay (``ServerState.rtt``);
* processing time: ``work / (cpu_speed * task.cpus)`` — ``work`` is in work units,
  ``cpu_speed`` is work units per second per CPU (:func:`processing_time`);
* the result comes back after ``D2 = k``;
* the response time ``T`` of a task is from its submission to its result being back.

Contract with the callers (simulator and live daemons)
------------------------------------------------------
* ``choose(task, servers, now)`` gets a **non-empty** sequence of servers that
  **already admit the task**: ``mem_free >= task.mem`` and ``cpus >= task.cpus``
  (seed 004: "dispatched can be performed only when the task size is smaller than
  the remaining memory of the server"). Use :func:`admissible` to filter. If no
  server admits the task the caller keeps it queued and asks again later. It
  returns an index into ``servers``.
* ``plan(tasks, edges, servers, now)`` is called once per job when it is accepted,
  before any of its tasks is chosen; ``edges`` are ``(before, after)`` task ids.
  Only HEFT uses it (upward ranks); for the others it is a no-op.
* ``priority(task)`` (optional, default 0.0): when several tasks are released at
  once, callers dispatch them in decreasing priority (HEFT: upward rank).
* ``observe(task, server_id, response_time, now)`` is called once when a task's
  result is back, with its response time ``T``; learners turn it into the reward
  ``e^(-T / time_scale)``. Calling it for a task the policy never chose is allowed
  and ignored by learners.
* ``pick(queue, server, now)`` gets a **non-empty** sequence of tasks that are
  ready to run on ``server`` now (dependencies finished, their results arrived,
  enough free CPUs) and returns an index into it.
* ``state_dict()`` returns a msgpack-able dict (str keys; ints, floats, str,
  bytes, lists, dicts) and ``load_state_dict(d)`` restores it, so that learned
  weights survive restarts. Classic policies return their name and RNG state.

Unknown names in the registry raise :class:`ValueError` with the list of known
names, so the CLI and config loader can show a one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DISPATCH_POLICIES",
    "QUEUE_POLICIES",
    "DispatchPolicy",
    "QueuePolicy",
    "ServerState",
    "TaskInfo",
    "admissible",
    "estimated_wait",
    "processing_time",
    "reward",
    "rng_state",
    "set_rng_state",
    "transfer_delay",
]

DISPATCH_POLICIES = ("nearest", "random", "least-load", "heft", "dqn")
QUEUE_POLICIES = ("fcfs", "sjf", "edf", "marl")


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A generator's state as msgpack-able values (its 128-bit ints as strings)."""
    st = rng.bit_generator.state
    return {
        "bit_generator": st["bit_generator"],
        "state": {"state": str(st["state"]["state"]), "inc": str(st["state"]["inc"])},
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def set_rng_state(rng: np.random.Generator, d: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    rng.bit_generator.state = {
        "bit_generator": d["bit_generator"],
        "state": {"state": int(d["state"]["state"]), "inc": int(d["state"]["inc"])},
        "has_uint32": int(d["has_uint32"]),
        "uinteger": int(d["uinteger"]),
    }


@dataclass(slots=True)
class ServerState:
    """What a policy may know about one server (a worker node) at decision time."""

    id: str
    cpus: float  # CPU slots of the server
    cpu_speed: float  # work units per second per CPU
    mem_total: float  # bytes (or any unit, the same as TaskInfo.mem)
    mem_free: float  # memory not reserved by tasks dispatched to it and unfinished
    bandwidth: float  # bytes per second from the access point to the server
    rtt: float  # seconds: propagation delay k between the access point and the server
    queue_len: int  # tasks dispatched to the server and not running yet
    running: int  # tasks running now
    queued_work: float  # work units not done yet: waiting tasks + the rest of running ones


@dataclass(slots=True)
class TaskInfo:
    """What a policy may know about one task."""

    id: str
    job: str
    work: float  # work units (seed 004: T.size as processing demand)
    data_size: float  # bytes to ship to the server (seed 004: T.size as data)
    mem: float  # memory reserved on the server from dispatch to completion
    cpus: float  # CPU slots it occupies while running
    deadline: float | None  # absolute time, same clock as `submitted`
    submitted: float  # absolute time the job reached the dispatcher
    depth: int = 0  # length of the longest chain of predecessors


@runtime_checkable
class DispatchPolicy(Protocol):
    name: str

    def plan(
        self,
        tasks: Sequence[TaskInfo],
        edges: Sequence[tuple[str, str]],
        servers: Sequence[ServerState],
        now: float,
    ) -> None: ...

    def priority(self, task: TaskInfo) -> float: ...

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int: ...

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


@runtime_checkable
class QueuePolicy(Protocol):
    name: str

    def pick(self, queue: Sequence[TaskInfo], server: ServerState, now: float) -> int: ...

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- helpers


def processing_time(task: TaskInfo, server: ServerState) -> float:
    """Seconds to run ``task`` on ``server`` once started (seed 004: size / CPU)."""
    return task.work / (server.cpu_speed * max(task.cpus, 1e-9))


def transfer_delay(task: TaskInfo, server: ServerState) -> float:
    """D1 = k + data_size / bandwidth (seed 004, section II.B)."""
    return server.rtt + task.data_size / server.bandwidth


def estimated_wait(server: ServerState) -> float:
    """Seconds of work already queued on ``server``: its load as a waiting time.

    Seed 004's least-load baseline measures load as "the waiting time of the
    task"; with ``queued_work`` spread over all CPUs this is its estimate.
    """
    return server.queued_work / (server.cpu_speed * max(server.cpus, 1e-9))


def admissible(task: TaskInfo, servers: Sequence[ServerState]) -> list[int]:
    """Indices of the servers with room for ``task`` (memory admission + CPU count)."""
    return [
        i
        for i, s in enumerate(servers)
        if s.mem_free >= task.mem and s.cpus >= task.cpus
    ]


def reward(response_time: float, time_scale: float = 1.0) -> float:
    """Seed 004's reward e^(-T), with T measured in units of ``time_scale`` seconds.

    With ``time_scale = 1`` this is exactly the seed's e^(-T); tasks that take
    minutes all get ~0 then, so learners take a scale near a typical response time.
    """
    return math.exp(-max(response_time, 0.0) / time_scale)
