"""Queue (scheduling) policies: FCFS, SJF, EDF and seed 004's multi-agent scheduler.

``pick(queue, server, now)`` gets the tasks that are ready to run on ``server``
now, in the order they arrived at it, and returns the index of the one to start.
Ties are broken by arrival order, so every policy is deterministic.

* **fcfs** — the earliest submitted task (seed 004's First-Come-First-Serve);
  ties by arrival at the server.
* **sjf** — the shortest processing time on this server (Shortest-Job-First:
  "the shorter the completion time, the earlier the task is scheduled").
* **edf** — the earliest absolute deadline (the seed's Shortest-Deadline-First);
  tasks without a deadline go last, FCFS among themselves.
* **marl** — the multi-agent DQN scheduler of seed 004 (section III.C, Algorithm
  2). Each server is an agent with its own evaluation network, target network
  and replay memory. A state-action row describes one queued task as seen by the
  server (:func:`task_features`: time already waited, processing time, deadline
  slack, depth in its DAG, how it compares with the rest of the queue); the agent
  picks the row with the highest Q (ε-greedy while learning). The agents
  cooperate, so they share **one reward**: the team reward of an agent's decision
  is the mean of ``e^(-T / time_scale)`` over *all* tasks, on any server, that
  finished between this decision and the same agent's next one (seed 004: "give
  a unified reward after all servers select a task"). The next decision's rows
  are the next state; the target is ``y = R + beta * max Q_target(S', A')``.
  A server seen for the first time starts with a copy of the weights of the
  most recently active agent (a new worker inherits its colleagues' experience),
  then learns on its own replay memory.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.core.dispatch.base import ServerState, TaskInfo, processing_time, reward, rng_state, set_rng_state
from shoal.core.dispatch.mlp import MLP, linear_epsilon, td_targets

N_TASK_FEATURES = 10
# A live dispatcher sees workers come and go; keep at most this many agents
# (least recently used dropped). Each is a few kilobytes of weights.
MAX_AGENTS = 1024


class _Classic:
    name = "classic"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": 1}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("policy") != self.name:
            raise ValueError(f"state is for policy {d.get('policy')!r}, not {self.name!r}")


class FCFS(_Classic):
    name = "fcfs"

    def pick(self, queue: Sequence[TaskInfo], server: ServerState, now: float) -> int:
        return min(range(len(queue)), key=lambda i: (queue[i].submitted, i))


class SJF(_Classic):
    name = "sjf"

    def pick(self, queue: Sequence[TaskInfo], server: ServerState, now: float) -> int:
        return min(range(len(queue)), key=lambda i: (processing_time(queue[i], server), i))


class EDF(_Classic):
    name = "edf"

    def pick(self, queue: Sequence[TaskInfo], server: ServerState, now: float) -> int:
        def key(i: int) -> tuple[float, float, int]:
            d = queue[i].deadline
            return (math.inf if d is None else d, queue[i].submitted, i)

        return min(range(len(queue)), key=key)


def task_features(
    queue: Sequence[TaskInfo], server: ServerState, now: float, time_scale: float
) -> np.ndarray:
    """One row of :data:`N_TASK_FEATURES` numbers per queued task."""
    procs = [processing_time(t, server) for t in queue]
    slacks = [
        (t.deadline - now - p) / time_scale if t.deadline is not None else math.inf
        for t, p in zip(queue, procs, strict=True)
    ]
    finite = [s for s in slacks if s != math.inf]
    min_slack = min(finite) if finite else 0.0
    max_proc = max(procs) or 1.0
    first = min(t.submitted for t in queue)
    rows = np.empty((len(queue), N_TASK_FEATURES))
    for i, t in enumerate(queue):
        has_dl = slacks[i] != math.inf
        slack = slacks[i] if has_dl else 10.0
        rows[i] = (
            math.log1p(max(now - t.submitted, 0.0) / time_scale),
            math.log1p(procs[i] / time_scale),
            math.tanh(slack),
            1.0 if has_dl else 0.0,
            1.0 if has_dl and slack < 0 else 0.0,
            math.tanh(slack - min_slack) if has_dl else 1.0,
            procs[i] / max_proc,
            math.log1p(t.submitted - first) if t.submitted > first else 0.0,
            min(t.depth, 10) / 10.0,
            math.log1p(len(queue)) / 3.0,
        )
    return rows


class _Agent:
    """One server's evaluation network, target network and replay memory."""

    def __init__(self, seed: int, hidden: Sequence[int], lr: float, optimizer: str, capacity: int):
        sizes = [N_TASK_FEATURES, *[int(h) for h in hidden], 1]
        self.net = MLP(sizes, optimizer=optimizer, lr=lr, seed=seed)
        self.target = MLP(sizes, optimizer=optimizer, lr=lr, seed=seed)
        self.target.copy_from(self.net)
        self.capacity = capacity
        self.x = np.zeros((capacity, N_TASK_FEATURES))
        self.r = np.zeros(capacity)
        self.next: list[np.ndarray | None] = [None] * capacity
        self.size = 0
        self.pos = 0
        self.steps = 0
        # the last decision, waiting for its reward: (row, team sum, team count)
        self.pending: tuple[np.ndarray, float, int] | None = None

    def store(self, x: np.ndarray, r: float, x_next: np.ndarray | None) -> None:
        self.x[self.pos] = x
        self.r[self.pos] = r
        self.next[self.pos] = x_next
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)


class MultiAgentScheduler:
    name = "marl"

    def __init__(
        self,
        *,
        seed: int = 0,
        time_scale: float = 1.0,
        hidden: Sequence[int] = (32, 32),
        lr: float = 1e-3,
        optimizer: str = "adam",
        beta: float = 0.3,
        eps_start: float = 1.0,
        eps_end: float = 0.05,
        eps_decay: int = 2000,
        capacity: int = 2000,
        batch: int = 32,
        sync_every: int = 100,
        learning: bool = True,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if capacity < batch or batch < 1:
            raise ValueError(f"need 1 <= batch <= capacity, got batch={batch} capacity={capacity}")
        self.seed = int(seed)
        self.time_scale = float(time_scale)
        self.hidden = [int(h) for h in hidden]
        self.lr, self.optimizer = float(lr), optimizer
        self.beta = float(beta)
        self.eps_start, self.eps_end, self.eps_decay = float(eps_start), float(eps_end), int(eps_decay)
        self.capacity, self.batch, self.sync_every = int(capacity), int(batch), max(int(sync_every), 1)
        self.learning = bool(learning)
        self.rng = np.random.default_rng(seed)
        self.agents: OrderedDict[str, _Agent] = OrderedDict()
        self.decisions = 0
        # the one shared reward: cumulative sum and count of all task rewards
        self.team_sum = 0.0
        self.team_count = 0

    @property
    def epsilon(self) -> float:
        if not self.learning:
            return 0.0
        return linear_epsilon(self.decisions, self.eps_start, self.eps_end, self.eps_decay)

    def agent(self, server_id: str) -> _Agent:
        a = self.agents.get(server_id)
        if a is None:
            # The same server always starts from the same weights for a given seed.
            a_seed = (self.seed * 1_000_003 + zlib.crc32(server_id.encode())) % 2**32
            a = _Agent(a_seed, self.hidden, self.lr, self.optimizer, self.capacity)
            if self.agents:
                # A server that joins later starts from the experience of the
                # most recently active agent rather than from scratch.
                last = next(reversed(self.agents.values()))
                a.net.copy_from(last.net)
                a.target.copy_from(last.target)
            self.agents[server_id] = a
            while len(self.agents) > MAX_AGENTS:
                self.agents.popitem(last=False)
        else:
            self.agents.move_to_end(server_id)
        return a

    def pick(self, queue: Sequence[TaskInfo], server: ServerState, now: float) -> int:
        agent = self.agent(server.id)
        x = task_features(queue, server, now, self.time_scale)
        if self.learning and self.rng.random() < self.epsilon:
            choice = int(self.rng.integers(len(queue)))
        else:
            choice = int(np.argmax(agent.net(x)[:, 0]))
        self.decisions += 1
        if self.learning:
            if agent.pending is not None:
                row, s0, c0 = agent.pending
                if self.team_count > c0:
                    r = (self.team_sum - s0) / (self.team_count - c0)
                    agent.store(row, r, x)
                    self._train(agent)
            agent.pending = (x[choice].copy(), self.team_sum, self.team_count)
        return choice

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None:
        self.team_sum += reward(response_time, self.time_scale)
        self.team_count += 1

    def _train(self, agent: _Agent) -> None:
        if agent.size < self.batch:
            return
        idx, y = td_targets(self.rng, agent.size, self.batch, agent.r, agent.next, agent.target, self.beta)
        agent.net.train_batch(agent.x[idx], y[:, None])
        agent.steps += 1
        if agent.steps % self.sync_every == 0:
            agent.target.copy_from(agent.net)

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "version": 1,
            "decisions": self.decisions,
            "rng": rng_state(self.rng),
            "agents": [
                [sid, {"net": a.net.state_dict(), "target": a.target.state_dict(), "steps": a.steps}]
                for sid, a in self.agents.items()
            ],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("policy") != self.name:
            raise ValueError(f"state is for policy {d.get('policy')!r}, not {self.name!r}")
        self.decisions = int(d["decisions"])
        set_rng_state(self.rng, d["rng"])
        self.agents = OrderedDict()
        for sid, ad in d["agents"]:
            a = self.agent(sid)
            a.net.load_state_dict(ad["net"])
            a.target.load_state_dict(ad["target"])
            a.steps = int(ad["steps"])
