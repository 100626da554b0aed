"""A small multilayer perceptron in numpy, with Adam and RMSProp, for the learned policies.

Theory of operation
-------------------
The network maps a batch ``x`` of shape ``(n, d_in)`` to ``(n, d_out)``::

    h_0 = x;  h_{l+1} = act(h_l W_l + b_l)  (hidden layers);  y = h_L W_L + b_L

with ``act`` = ReLU or tanh and a linear output layer, which is what a Q-value
regressor needs. Training minimises the mean squared error
``L = mean((y - target)^2)`` over the batch (seed 004, eq. 3), by backpropagation:
``dL/dy = 2 (y - target) / (n * d_out)``, then for each layer from the top
``dW = h^T g``, ``db = sum(g)``, ``g <- (g W^T) * act'(pre-activation)``.
:meth:`MLP.loss_and_grads` exposes the gradients so tests check them against
finite differences.

Optimisers, each an update of the parameter ``p`` from its gradient ``g``:

* Adam (Kingma and Ba 2015): ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
  ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected ``m_hat, v_hat``;
* RMSProp (Tieleman and Hinton 2012): ``v = rho v + (1-rho) g^2``,
  ``p -= lr * g / (sqrt(v) + eps)``.

Gradients are clipped by global norm (``clip``) so one outlier batch cannot
blow the weights up. Everything is float64: the networks are tiny and the
finite-difference check needs the precision.

Weights and optimiser state serialise to a msgpack-able dict
(:meth:`MLP.state_dict`): arrays become ``{"shape": [...], "data": bytes}``
(little-endian float64), so a learned policy survives restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ACTIVATIONS = ("relu", "tanh")
OPTIMIZERS = ("adam", "rmsprop", "sgd")


def _pack(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "data": np.ascontiguousarray(a, dtype="<f8").tobytes()}


def _unpack(d: dict[str, Any]) -> np.ndarray:
    a = np.frombuffer(d["data"], dtype="<f8").astype(np.float64)
    return a.reshape(tuple(d["shape"]))


class MLP:
    def __init__(
        self,
        sizes: Sequence[int],
        *,
        activation: str = "relu",
        optimizer: str = "adam",
        lr: float = 1e-3,
        clip: float = 10.0,
        seed: int = 0,
    ) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must be >= 2 positive ints, got {list(sizes)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.sizes = [int(s) for s in sizes]
        self.activation = activation
        self.optimizer = optimizer
        self.lr = float(lr)
        self.clip = float(clip)
        rng = np.random.default_rng(seed)
        self.params: list[np.ndarray] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            # He initialisation for ReLU, Glorot for tanh.
            scale = np.sqrt((2.0 if activation == "relu" else 1.0) / fan_in)
            self.params.append(rng.normal(0.0, scale, (fan_in, fan_out)))
            self.params.append(np.zeros(fan_out))
        self._m = [np.zeros_like(p) for p in self.params]
        self._v = [np.zeros_like(p) for p in self.params]
        self._t = 0

    # ------------------------------------------------------------------ forward/backward

    def _act(self, z: np.ndarray) -> np.ndarray:
        return np.maximum(z, 0.0) if self.activation == "relu" else np.tanh(z)

    def _act_grad(self, z: np.ndarray, h: np.ndarray) -> np.ndarray:
        return (z > 0.0).astype(np.float64) if self.activation == "relu" else 1.0 - h * h

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        n_layers = len(self.params) // 2
        for i in range(n_layers):
            h = h @ self.params[2 * i] + self.params[2 * i + 1]
            if i < n_layers - 1:
                h = self._act(h)
        return h

    __call__ = forward

    def loss_and_grads(
        self, x: np.ndarray, target: np.ndarray
    ) -> tuple[float, list[np.ndarray]]:
        """Mean squared error over the batch and its gradient for every parameter."""
        x = np.asarray(x, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64).reshape(len(x), -1)
        n_layers = len(self.params) // 2
        hs = [x]
        zs = []
        h = x
        for i in range(n_layers):
            z = h @ self.params[2 * i] + self.params[2 * i + 1]
            zs.append(z)
            h = self._act(z) if i < n_layers - 1 else z
            hs.append(h)
        diff = h - target
        loss = float(np.mean(diff * diff))
        g = 2.0 * diff / diff.size
        grads: list[np.ndarray] = [np.empty(0)] * len(self.params)
        for i in reversed(range(n_layers)):
            grads[2 * i] = hs[i].T @ g
            grads[2 * i + 1] = g.sum(axis=0)
            if i > 0:
                g = (g @ self.params[2 * i].T) * self._act_grad(zs[i - 1], hs[i])
        return loss, grads

    def step(self, grads: list[np.ndarray]) -> None:
        """Apply one optimiser update with ``grads`` (same layout as ``params``)."""
        norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in grads)))
        if self.clip > 0 and norm > self.clip:
            grads = [g * (self.clip / norm) for g in grads]
        self._t += 1
        eps = 1e-8
        if self.optimizer == "adam":
            b1, b2 = 0.9, 0.999
            c1 = 1.0 - b1**self._t
            c2 = 1.0 - b2**self._t
            for p, g, m, v in zip(self.params, grads, self._m, self._v, strict=True):
                m *= b1
                m += (1.0 - b1) * g
                v *= b2
                v += (1.0 - b2) * g * g
                p -= self.lr * (m / c1) / (np.sqrt(v / c2) + eps)
        elif self.optimizer == "rmsprop":
            rho = 0.9
            for p, g, v in zip(self.params, grads, self._v, strict=True):
                v *= rho
                v += (1.0 - rho) * g * g
                p -= self.lr * g / (np.sqrt(v) + eps)
        else:
            for p, g in zip(self.params, grads, strict=True):
                p -= self.lr * g

    def train_batch(self, x: np.ndarray, target: np.ndarray) -> float:
        """One gradient step on the batch; returns the loss before the step."""
        loss, grads = self.loss_and_grads(x, target)
        self.step(grads)
        return loss

    # ------------------------------------------------------------------ copies and persistence

    def copy_from(self, other: MLP) -> None:
        """Copy the weights of ``other`` (the DQN target-network update)."""
        if other.sizes != self.sizes:
            raise ValueError(f"shape mismatch: {other.sizes} vs {self.sizes}")
        for p, q in zip(self.params, other.params, strict=True):
            p[...] = q

    def state_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "activation": self.activation,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "clip": self.clip,
            "t": self._t,
            "params": [_pack(p) for p in self.params],
            "m": [_pack(a) for a in self._m],
            "v": [_pack(a) for a in self._v],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if list(d["sizes"]) != self.sizes:
            raise ValueError(f"saved network has sizes {list(d['sizes'])}, expected {self.sizes}")
        self.activation = d["activation"]
        self.optimizer = d["optimizer"]
        self.lr = float(d["lr"])
        self.clip = float(d["clip"])
        self._t = int(d["t"])
        self.params = [_unpack(p) for p in d["params"]]
        self._m = [_unpack(a) for a in d["m"]]
        self._v = [_unpack(a) for a in d["v"]]

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> MLP:
        net = cls(d["sizes"], activation=d["activation"], optimizer=d["optimizer"], lr=d["lr"])
        net.load_state_dict(d)
        return net


# -- what the two learned policies (dqn.py, schedulers.py) share ---------------------------


def linear_epsilon(decisions: int, start: float, end: float, decay: int) -> float:
    """Exploration rate: from ``start`` to ``end`` over the first ``decay`` decisions."""
    frac = min(decisions / max(decay, 1), 1.0)
    return start + (end - start) * frac


def td_targets(rng: np.random.Generator, size: int, batch: int, rewards: np.ndarray, nexts: Sequence,
               target: MLP, discount: float) -> tuple[np.ndarray, np.ndarray]:
    """A minibatch from a replay memory of ``size`` entries, and its Q-learning targets.

    Entry i holds reward ``rewards[i]`` and ``nexts[i]``, the feature rows of
    the choices available at the next decision (None: none recorded). The
    target is r + discount * max over those rows of the target network's Q.
    Returns (indices, targets).
    """
    idx = rng.integers(size, size=batch)
    y = rewards[idx].copy()
    chosen = [nexts[i] for i in idx]
    live = [j for j, n in enumerate(chosen) if n is not None]
    if live and discount > 0:
        q = target(np.concatenate([chosen[j] for j in live]))[:, 0]
        starts = np.cumsum([0] + [len(chosen[j]) for j in live[:-1]])
        y[live] += discount * np.maximum.reduceat(q, starts)
    return idx, y
