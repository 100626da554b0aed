"""The numpy MLP: gradients against finite differences, training, persistence."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shoal.core.dispatch.mlp import MLP


def numeric_grads(net: MLP, x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    grads = []
    for p in net.params:
        g = np.zeros_like(p)
        it = np.nditer(p, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            old = p[i]
            p[i] = old + eps
            lp, _ = net.loss_and_grads(x, y)
            p[i] = old - eps
            lm, _ = net.loss_and_grads(x, y)
            p[i] = old
            g[i] = (lp - lm) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gradients_match_finite_differences(activation: str) -> None:
    rng = np.random.default_rng(3)
    net = MLP([5, 7, 6, 2], activation=activation, seed=1)
    for p in net.params[1::2]:  # non-zero biases so every term is exercised
        p[...] = rng.normal(0, 0.1, p.shape)
    x = rng.normal(size=(9, 5))
    y = rng.normal(size=(9, 2))
    _, analytic = net.loss_and_grads(x, y)
    numeric = numeric_grads(net, x, y)
    for a, n in zip(analytic, numeric, strict=True):
        assert a.shape == n.shape
        err = np.max(np.abs(a - n)) / max(np.max(np.abs(n)), 1e-8)
        assert err < 1e-5, err


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_training_fits_a_smooth_function(optimizer: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(256, 2))
    y = (np.sin(x[:, 0]) + 0.5 * x[:, 1])[:, None]
    net = MLP([2, 32, 32, 1], optimizer=optimizer, lr=3e-3, seed=0)
    first = net.train_batch(x, y)
    for _ in range(800):
        last = net.train_batch(x, y)
    assert last < 0.05 * first, (first, last)


def test_state_dict_round_trip_through_msgpack() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4))
    y = rng.normal(size=(16, 1))
    net = MLP([4, 8, 1], optimizer="adam", lr=1e-2, seed=5)
    for _ in range(10):
        net.train_batch(x, y)
    blob = msgpack.packb(net.state_dict())
    clone = MLP.from_state_dict(msgpack.unpackb(blob))
    np.testing.assert_array_equal(net(x), clone(x))
    # The optimiser state came along too: the next step is identical.
    net.train_batch(x, y)
    clone.train_batch(x, y)
    for a, b in zip(net.params, clone.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_copy_from_and_shape_checks() -> None:
    a = MLP([3, 4, 1], seed=1)
    b = MLP([3, 4, 1], seed=2)
    x = np.ones((2, 3))
    assert not np.allclose(a(x), b(x))
    b.copy_from(a)
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(ValueError):
        MLP([3, 5, 1]).copy_from(a)
    with pytest.raises(ValueError):
        MLP([3, 5, 1]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        MLP([3])
    with pytest.raises(ValueError):
        MLP([3, 1], activation="sigmoid")
    with pytest.raises(ValueError):
        MLP([3, 1], optimizer="lbfgs")


def test_gradient_clipping_bounds_the_update() -> None:
    net = MLP([1, 1], optimizer="sgd", lr=1.0, clip=1.0, seed=0)
    before = [p.copy() for p in net.params]
    net.train_batch(np.array([[1e3]]), np.array([[1e6]]))
    moved = np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(net.params, before, strict=True)))
    assert moved == pytest.approx(1.0)
