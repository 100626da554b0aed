"""Vaidya's checkpoint overhead model (seed 003, IV.C, equations 1-3).

Symbols, as the seed names them:

- lambda  the rate of failures, 1 / MTBF (per second here)
- T_opt   the optimal checkpoint interval
- O       the average overhead per checkpoint (time added to the program's run time)
- L       the average latency per checkpoint (start to finish of one checkpoint)
- R       the average recovery time from a checkpoint
- Gamma   the expected time to complete an interval of T_opt useful work in the
          presence of failures, checkpointing and recovery
- r       the overhead ratio, Gamma / T_opt - 1

Equations:

    (1)  exp(lambda (T_opt + O)) (1 - lambda T_opt) = 1,  T_opt != 0
    (2)  Gamma = lambda^-1 exp(lambda (L - O + R)) (exp(lambda (T_opt + O)) - 1)
    (3)  r = Gamma / T_opt - 1

Solving (1): with x = lambda T and a = lambda O, take logarithms:
g(x) = x + a + ln(1 - x) = 0. g(0) = a > 0, g'(x) = 1 - 1/(1 - x) < 0 on (0, 1) and
g -> -inf as x -> 1, so for O > 0 there is exactly one root in (0, 1); it is found by
bisection (log1p/expm1 keep precision when lambda O is tiny). For small lambda O,
T_opt ~= sqrt(2 O / lambda) (Young's approximation), which the tests use as a check.

Units are whatever the caller uses consistently (the daemon uses seconds); the
seed's Tables 10-12 use lambda = 6.301e-6 with O, L, R in the same time unit.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Model(NamedTuple):
    T_opt: float
    gamma: float
    r: float


def _lam(mtbf: float) -> float:
    if not (mtbf > 0 and math.isfinite(mtbf)):
        raise ValueError(f"MTBF must be a positive finite number, got {mtbf!r}")
    return 1.0 / mtbf


def optimal_interval(O: float, L: float, R: float, mtbf: float) -> float:  # noqa: E741 - the seed's name
    """T_opt from equation (1). Depends on O and lambda only; L and R are accepted so
    that all three functions share one signature."""
    lam = _lam(mtbf)
    if not (O > 0 and math.isfinite(O)):
        raise ValueError(f"checkpoint overhead O must be positive, got {O!r}")
    a = lam * O
    lo, hi = 0.0, 1.0  # g(lo) > 0 > g(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if mid + a + math.log1p(-mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi) / lam


def gamma(O: float, L: float, R: float, mtbf: float, T: float | None = None) -> float:  # noqa: E741 - the seed's name
    """Gamma from equation (2), at interval T (default T_opt)."""
    lam = _lam(mtbf)
    if T is None:
        T = optimal_interval(O, L, R, mtbf)
    return math.exp(lam * (L - O + R)) * math.expm1(lam * (T + O)) / lam


def overhead_ratio(O: float, L: float, R: float, mtbf: float, T: float | None = None) -> float:  # noqa: E741 - the seed's name
    """r from equation (3), at interval T (default T_opt)."""
    if T is None:
        T = optimal_interval(O, L, R, mtbf)
    return gamma(O, L, R, mtbf, T) / T - 1.0


def model(O: float, L: float, R: float, mtbf: float) -> Model:  # noqa: E741 - the seed's name
    """All three at once: (T_opt, Gamma, r)."""
    T = optimal_interval(O, L, R, mtbf)
    g = gamma(O, L, R, mtbf, T)
    return Model(T, g, g / T - 1.0)
