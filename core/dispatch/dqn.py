"""The DQN dispatcher of seed 004 (DAMD, section III.B and Algorithm 1).

Theory of operation
-------------------
*State.* When a task is to be dispatched the agent looks at every admissible
server and builds one feature row per server (:func:`features`): the task's
transfer delay D1 = k + size/bandwidth to it, its processing time there, the
server's queued work as a waiting time, the estimated finish time, queue length,
running tasks per CPU, free memory, the propagation delay k, and the server's
share of the candidates' total capacity. Time-like features are divided by
``time_scale`` and squashed with log1p so they stay O(1).

*Action.* A server. Because the set of servers changes (workers join and leave,
memory admission filters them), the Q-network scores one (state, server) row at
a time — ``Q(s, a) = net(features(s, a))`` — and the action is the argmax over
the rows (ε-greedy: a uniformly random server with probability ε, which decays
linearly from ``eps_start`` to ``eps_end`` over ``eps_decay`` decisions).

*Reward.* When the task's result is back, :meth:`DQNDispatch.observe` gets its
response time T and the reward is ``r = e^(-T / time_scale)`` (the seed's
e^(-T) with T in units of ``time_scale``).

*Learning.* A transition ``(x_chosen, r, X_next)`` — ``X_next`` being the rows of
the next dispatch decision after this one — goes into a replay memory of
``capacity`` transitions (oldest dropped). Every ``train_every`` rewards the
network takes one Adam step on a minibatch of ``batch`` transitions sampled
uniformly, towards ``y = r + gamma * max_a' Q_target(X_next, a')`` (eq. 2 and 3);
the target network is a copy of the main one, refreshed every ``sync_every``
steps (Algorithm 1, line 16). A transition whose task is the last decision seen
so far (no next state yet) is terminal: ``y = r``.

*Persistence.* :meth:`state_dict` holds both networks, the optimiser state, the
decision counter (so ε keeps decaying where it stopped) and the RNG; the replay
memory is not saved — it refills within a few hundred tasks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.core.dispatch.base import (
    ServerState,
    TaskInfo,
    estimated_wait,
    processing_time,
    reward,
    rng_state,
    set_rng_state,
    transfer_delay,
)
from shoal.core.dispatch.mlp import MLP, linear_epsilon, td_targets

N_FEATURES = 10
# Decisions whose reward has not come back yet. A task that never reports (its
# job was cancelled) is forgotten once this many newer decisions are pending.
MAX_PENDING = 50_000


def features(
    task: TaskInfo, servers: Sequence[ServerState], now: float, time_scale: float
) -> np.ndarray:
    """One row of :data:`N_FEATURES` numbers per server (the DQN state-action input)."""
    caps = [s.cpus * s.cpu_speed for s in servers]
    total_cap = sum(caps) or 1.0
    rows = np.empty((len(servers), N_FEATURES))
    for i, s in enumerate(servers):
        d1 = transfer_delay(task, s)
        proc = processing_time(task, s)
        wait = estimated_wait(s)
        finish = max(d1, wait) + proc
        rows[i] = (
            math.log1p(d1 / time_scale),
            math.log1p(proc / time_scale),
            math.log1p(wait / time_scale),
            math.log1p(finish / time_scale),
            math.log1p(s.queue_len) / 3.0,
            s.running / max(s.cpus, 1e-9),
            s.mem_free / max(s.mem_total, 1e-9),
            math.log1p(s.rtt / time_scale),
            caps[i] / total_cap,
            1.0 / len(servers),
        )
    return rows


class DQNDispatch:
    name = "dqn"

    def __init__(
        self,
        *,
        seed: int = 0,
        time_scale: float = 1.0,
        hidden: Sequence[int] = (32, 32),
        lr: float = 1e-3,
        optimizer: str = "adam",
        gamma: float = 0.3,
        eps_start: float = 1.0,
        eps_end: float = 0.05,
        eps_decay: int = 2000,
        capacity: int = 5000,
        batch: int = 32,
        train_every: int = 1,
        sync_every: int = 200,
        learning: bool = True,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if not (0.0 <= eps_end <= 1.0 and 0.0 <= eps_start <= 1.0):
            raise ValueError("eps_start and eps_end must be in [0, 1]")
        if capacity < batch or batch < 1:
            raise ValueError(f"need 1 <= batch <= capacity, got batch={batch} capacity={capacity}")
        self.time_scale = float(time_scale)
        self.gamma = float(gamma)
        self.eps_start, self.eps_end, self.eps_decay = float(eps_start), float(eps_end), int(eps_decay)
        self.capacity, self.batch = int(capacity), int(batch)
        self.train_every, self.sync_every = max(int(train_every), 1), max(int(sync_every), 1)
        self.learning = bool(learning)
        self.rng = np.random.default_rng(seed)
        sizes = [N_FEATURES, *[int(h) for h in hidden], 1]
        self.net = MLP(sizes, optimizer=optimizer, lr=lr, seed=seed)
        self.target = MLP(sizes, optimizer=optimizer, lr=lr, seed=seed)
        self.target.copy_from(self.net)
        self.decisions = 0
        self.train_steps = 0
        self._rewards_seen = 0
        # task id -> [chosen row, next-state rows or None]
        self._pending: OrderedDict[str, list[Any]] = OrderedDict()
        self._waiting_next: list[str] = []
        # replay memory (ring buffer)
        self._x = np.zeros((self.capacity, N_FEATURES))
        self._r = np.zeros(self.capacity)
        self._next: list[np.ndarray | None] = [None] * self.capacity
        self._size = 0
        self._pos = 0
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ interface

    def plan(self, tasks, edges, servers, now) -> None:  # noqa: ANN001 - see policy.py
        return None

    def priority(self, task: TaskInfo) -> float:
        return 0.0

    @property
    def epsilon(self) -> float:
        if not self.learning:
            return 0.0
        return linear_epsilon(self.decisions, self.eps_start, self.eps_end, self.eps_decay)

    def q_values(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> np.ndarray:
        return self.net(features(task, servers, now, self.time_scale))[:, 0]

    def choose(self, task: TaskInfo, servers: Sequence[ServerState], now: float) -> int:
        x = features(task, servers, now, self.time_scale)
        if self.learning and self.rng.random() < self.epsilon:
            a = int(self.rng.integers(len(servers)))
        else:
            a = int(np.argmax(self.net(x)[:, 0]))
        self.decisions += 1
        if self.learning:
            for tid in self._waiting_next:
                entry = self._pending.get(tid)
                if entry is not None:
                    entry[1] = x
            self._waiting_next = [task.id]
            self._pending[task.id] = [x[a].copy(), None]
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return a

    def observe(self, task: TaskInfo, server_id: str, response_time: float, now: float) -> None:
        entry = self._pending.pop(task.id, None)
        if entry is None or not self.learning:
            return
        x, x_next = entry
        self._x[self._pos] = x
        self._r[self._pos] = reward(response_time, self.time_scale)
        self._next[self._pos] = x_next
        self._pos = (self._pos + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        self._rewards_seen += 1
        if self._size >= self.batch and self._rewards_seen % self.train_every == 0:
            self._train()

    # ------------------------------------------------------------------ learning

    def _train(self) -> None:
        idx, y = td_targets(self.rng, self._size, self.batch, self._r, self._next, self.target, self.gamma)
        self.last_loss = self.net.train_batch(self._x[idx], y[:, None])
        self.train_steps += 1
        if self.train_steps % self.sync_every == 0:
            self.target.copy_from(self.net)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "version": 1,
            "net": self.net.state_dict(),
            "target": self.target.state_dict(),
            "decisions": self.decisions,
            "train_steps": self.train_steps,
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("policy") != self.name:
            raise ValueError(f"state is for policy {d.get('policy')!r}, not {self.name!r}")
        self.net.load_state_dict(d["net"])
        self.target.load_state_dict(d["target"])
        self.decisions = int(d["decisions"])
        self.train_steps = int(d["train_steps"])
        set_rng_state(self.rng, d["rng"])
