"""Classic dispatch policies: nearest, random, least-load (seed 004's baselines) and HEFT.

All of them are deterministic given their seed and their inputs; ties are broken by
the lowest index, so a run is reproducible. ``servers`` passed to ``choose`` already
admit the task (see :mod:`.policy`).

* **nearest** — the server with the smallest propagation delay ``k`` (``rtt``).
  Seed 004's "Nearest"; it piles tasks onto the closest server until its memory is
  full.
* **random** — a uniformly random admissible server (seed 004's "Random").
* **least-load** — the server whose queued work, expressed as a waiting time
  (:func:`~.policy.estimated_wait`), is smallest; ties go to the nearer one. Seed
  004's "Least load: ... we use the waiting time of the task".
* **heft** — Heterogeneous Earliest Finish Time (Topcuoglu, Hariri and Wu, 2002)
  made online. ``plan`` computes each task's *upward rank*: its mean processing
  time over the servers plus the largest (mean transfer delay + rank) of its
  successors, which is the length of the critical path from the task to the end
  of its job. Callers dispatch released tasks in decreasing rank
  (:meth:`Heft.priority`). ``choose`` then picks the server with the earliest
  estimated finish time::

      EFT(s) = max(now + D1(s) + D3(s), now + wait(s)) + processing(s)

  where ``D3(s) = k(s)`` if some predecessor was placed on another server (seed
  004: a remote predecessor's result costs a propagation delay) and ``wait(s)``
  is the server's queued work as a waiting time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.core.dispatch.base import (
    ServerState,
    TaskInfo,
    estimated_wait,
    processing_time,
    rng_state,
    set_rng_state,
    transfer_delay,
)

# HEFT remembers ranks, predecessors and placements of tasks of recent jobs. Bound
# them so a long-running dispatcher does not grow without limit; a task forgotten
# early just gets rank 0 and "no remote predecessor".
HEFT_MAX_TASKS = 100_000


class _Base:
    """No-op defaults for the optional parts of the interface."""

    name = "base"

    def __init__(self, *, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def plan(self, tasks, edges, servers, now) -> None:  # noqa: ANN001 - see policy.py
        return None

    def priority(self, task: TaskInfo) -> float:
        return 0.0

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": 1, "rng": rng_state(self.rng)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("policy") != self.name:
            raise ValueError(f"state is for policy {d.get('policy')!r}, not {self.name!r}")
        set_rng_state(self.rng, d["rng"])


class Nearest(_Base):
    name = "nearest"

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int:
        return min(range(len(servers)), key=lambda i: servers[i].rtt)


class RandomDispatch(_Base):
    name = "random"

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int:
        return int(self.rng.integers(len(servers)))


class LeastLoad(_Base):
    name = "least-load"

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int:
        return min(range(len(servers)), key=lambda i: (estimated_wait(servers[i]), servers[i].rtt))


class Heft(_Base):
    name = "heft"

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.rank: OrderedDict[str, float] = OrderedDict()
        self.preds: dict[str, list[str]] = {}
        self.placed: OrderedDict[str, str] = OrderedDict()

    def plan(
        self,
        tasks: Sequence[TaskInfo],
        edges: Sequence[tuple[str, str]],
        servers: Sequence[ServerState],
        now: float,
    ) -> None:
        by_id = {t.id: t for t in tasks}
        succs: dict[str, list[str]] = {t.id: [] for t in tasks}
        preds: dict[str, list[str]] = {t.id: [] for t in tasks}
        for a, b in edges:
            if a in by_id and b in by_id:
                succs[a].append(b)
                preds[b].append(a)

        def mean_proc(t: TaskInfo) -> float:
            if not servers:
                return t.work
            return sum(processing_time(t, s) for s in servers) / len(servers)

        # Results are small (seed 004: D3 = k), so a mean edge costs a mean k.
        mean_k = sum(s.rtt for s in servers) / len(servers) if servers else 0.0
        # Reverse topological order by Kahn's algorithm on successors.
        outdeg = {tid: len(succs[tid]) for tid in by_id}
        ready = [tid for tid, d in outdeg.items() if d == 0]
        rank: dict[str, float] = {}
        while ready:
            tid = ready.pop()
            rank[tid] = mean_proc(by_id[tid]) + max(
                (mean_k + rank[s] for s in succs[tid]), default=0.0
            )
            for p in preds[tid]:
                outdeg[p] -= 1
                if outdeg[p] == 0:
                    ready.append(p)
        if len(rank) != len(by_id):
            raise ValueError("job graph has a cycle")
        for tid, r in rank.items():
            self.rank[tid] = r
            self.preds[tid] = preds[tid]
        while len(self.rank) > HEFT_MAX_TASKS:
            old, _ = self.rank.popitem(last=False)
            self.preds.pop(old, None)

    def priority(self, task: TaskInfo) -> float:
        return self.rank.get(task.id, 0.0)

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int:
        pred_servers = {self.placed[p] for p in self.preds.get(task.id, ()) if p in self.placed}

        def eft(i: int) -> float:
            s = servers[i]
            remote = any(ps != s.id for ps in pred_servers)
            arrive = now + transfer_delay(task, s) + (s.rtt if remote else 0.0)
            start = max(arrive, now + estimated_wait(s))
            return start + processing_time(task, s)

        best = min(range(len(servers)), key=lambda i: (eft(i), i))
        self.placed[task.id] = servers[best].id
        while len(self.placed) > HEFT_MAX_TASKS:
            self.placed.popitem(last=False)
        return best

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["rank"] = [[k, v] for k, v in self.rank.items()]
        d["preds"] = [[k, v] for k, v in self.preds.items()]
        d["placed"] = [[k, v] for k, v in self.placed.items()]
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.rank = OrderedDict((k, float(v)) for k, v in d.get("rank", []))
        self.preds = {k: list(v) for k, v in d.get("preds", [])}
        self.placed = OrderedDict((k, v) for k, v in d.get("placed", []))
