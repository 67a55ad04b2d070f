"""Banded Toeplitz strategies for matrix-factorization (DP-MF / BandMF) noise, on the host.

Place in the data path: none at step time. These are host-side NumPy/SciPy
functions, run once per run before training, that give the coefficients ``c``
:func:`jaxdp.privatize_banded` (:mod:`jaxdp.noise.banded`) uses inside the jitted
step. They know nothing about accounting: picking the band count at a target ε
(which needs the accountant) is :func:`jaxdp.accounting.choose_bands`.

The mechanism (Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization
Mechanisms" and "(Amplified) Banded Matrix Factorization"): factor the prefix-sum
workload ``A`` (``T x T`` lower-triangular ones) as ``A = B C`` and release
``C x + z`` for the stream of clipped gradient sums ``x`` (row t = step t) with
``z ~ N(0, σ²C_clip² I)``. Training consumes the *gradient* estimate
``C^{-1}(C x + z) = x + C^{-1} z``, so the noise added to the gradient at step t is

    w_t = (C^{-1} z)_t.

Here ``C`` is lower-triangular, **Toeplitz** and **b-banded** with coefficients
``c = (c_0, ..., c_{b-1})``, ``c_0 > 0``: ``C[t, s] = c_{t-s}`` for ``0 <= t-s < b``.
Forward substitution gives the streaming recursion used inside the jitted step
(:func:`jaxdp.privatize_banded`), which keeps only the last ``b - 1`` w's:

    w_t = (z_t - Σ_{j=1}^{b-1} c_j w_{t-j}) / c_0        (w_{<0} = 0).

Sensitivity: one participation changes one column of ``C x``; the largest column
norm of a b-banded Toeplitz ``C`` (T >= b) is ``‖c‖₂``. Strategies are kept
normalised to ``‖c‖₂ = 1``, so with per-example clipping to C the per-participation
sensitivity is C, exactly as in DP-SGD (``c = (1,)`` *is* DP-SGD: ``w_t = z_t``).

Optimised coefficients minimise the total squared error of the prefix sums,
``‖A C^{-1}‖_F² · max_col_norm(C)²`` (the error of ``B z`` with ``B = A C^{-1}``),
over b-banded Toeplitz ``C``. ``C^{-1}`` is lower-triangular Toeplitz with first
column ``d`` (the impulse response of the filter ``1 / c(x)``), ``A C^{-1}`` is
Toeplitz with first column ``e = cumsum(d)``, so

    ‖A C^{-1}‖_F² = Σ_{k=0}^{T-1} (T - k) e_k²

costs O(T b) (an IIR filter), and so does its gradient. The optimisation runs on
the host once per ``(T, b)`` and is cached.

Plugging in your own coefficients: any ``c`` with ``c_0 > 0`` whose filter
``1 / c(x)`` is stable works; pass it normalised to ``‖c‖₂ = 1`` as
``PrivacyPlan(..., noise_coefficients=c)`` or ``privatize_banded(coefficients=c)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, signal

from jaxdp import rules

__all__ = [
    "check_coefficients",
    "dense_strategy",
    "inverse_coefficients",
    "optimal_coefficients",
    "prefix_sum_error",
    "sqrt_coefficients",
]


def _check_steps(num_steps, name: str = "num_steps") -> int:
    if isinstance(num_steps, np.integer):
        num_steps = int(num_steps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{name}={num_steps!r} must be a positive int (the number of noisy steps of the run).")
    return num_steps


def check_coefficients(coefficients: Sequence[float] | np.ndarray, *, atol: float = 1e-6) -> np.ndarray:
    """Validate strategy coefficients ``c`` (1-D, finite, ``c_0 > 0``, ``‖c‖₂ = 1``) and return them as float64.

    Raises:
      ValueError: naming the problem and the fix (e.g. divide by the norm).
    """
    c = np.asarray(coefficients, dtype=np.float64)
    if c.ndim != 1 or c.size < 1 or not np.all(np.isfinite(c)):
        raise ValueError(
            f"coefficients={coefficients!r} must be a non-empty 1-D sequence of finite floats "
            "(c_0, ..., c_{b-1}) of a b-banded Toeplitz strategy."
        )
    if c[0] <= 0:
        raise ValueError(f"coefficients[0]={c[0]!r} must be > 0 (the strategy matrix must be invertible).")
    norm = float(np.linalg.norm(c))
    if abs(norm - 1.0) > atol:
        raise ValueError(
            f"coefficients have L2 norm {norm:.6g}, expected 1: the norm is the sensitivity of one participation, "
            "and the accountant assumes 1. Pass c / np.linalg.norm(c)."
        )
    return c


def inverse_coefficients(coefficients: Sequence[float] | np.ndarray, num_steps: int) -> np.ndarray:
    """First column ``d`` of ``C^{-1}`` (``T = num_steps`` entries): the noise on step t is Σ_s d_{t-s} z_s."""
    c = np.asarray(coefficients, dtype=np.float64)
    impulse = np.zeros(_check_steps(num_steps))
    impulse[0] = 1.0
    return signal.lfilter([1.0], c, impulse)


def dense_strategy(coefficients: Sequence[float] | np.ndarray, num_steps: int) -> np.ndarray:
    """The ``T x T`` lower-triangular b-banded Toeplitz matrix ``C`` (a reference for small T)."""
    c = np.asarray(coefficients, dtype=np.float64)
    t = _check_steps(num_steps)
    m = np.zeros((t, t))
    for j, cj in enumerate(c[:t]):
        m += cj * np.eye(t, k=-j)
    return m


def prefix_sum_error(coefficients: Sequence[float] | np.ndarray, num_steps: int) -> float:
    """Total squared error of the prefix sums, ``‖A C^{-1}‖_F² · max_col_norm(C)²``, in O(T b).

    Per unit noise variance: multiply by ``(σ C_clip)²``. DP-SGD (``c = (1,)``)
    gives ``T (T + 1) / 2``.
    """
    return _error_and_grad(np.asarray(coefficients, dtype=np.float64), _check_steps(num_steps))[0]


def _error_and_grad(c: np.ndarray, t: int) -> tuple[float, np.ndarray]:
    """f(c) = ‖c[:T]‖² · Σ_k (T-k) e_k² and its gradient (e = cumsum of C^{-1}'s first column).

    ∂d/∂c_j = -shift_j(d * d) (differentiate c * d = δ), computed as a second
    filter pass, so value and gradient both cost O(T b).
    """
    b = len(c)
    d = inverse_coefficients(c, t)
    e = np.cumsum(d)
    w = t - np.arange(t, dtype=np.float64)
    loss = float(np.sum(w * e * e))
    g = np.cumsum(signal.lfilter([1.0], c, d))  # cumsum of d * d (truncated to T)
    we = w * e
    grad_loss = np.array([-2.0 * np.dot(we[j:], g[: t - j]) for j in range(min(b, t))] + [0.0] * max(0, b - t))
    cc = float(np.dot(c[:t], c[:t]))
    grad = cc * grad_loss
    grad[: min(b, t)] += 2.0 * c[: min(b, t)] * loss
    return cc * loss, grad


def sqrt_coefficients(bands: int) -> np.ndarray:
    """The square-root factorisation of ``A`` truncated to b bands, normalised (a good starting point).

    ``A = C²`` with Toeplitz ``C`` of coefficients ``binom(2k, k) / 4^k``
    (Fichtenberger et al. 2023); truncation keeps them positive and decreasing,
    so ``1 / c(x)`` stays stable.
    """
    b = rules.check_bands(bands)
    c = np.ones(b)
    for k in range(1, b):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
    return c / np.linalg.norm(c)


@functools.lru_cache(maxsize=64)
def _optimal(num_steps: int, bands: int) -> tuple[float, ...]:
    if bands == 1:
        return (1.0,)
    t = num_steps
    x0 = sqrt_coefficients(bands)
    x0 = x0[1:] / x0[0]  # fix c_0 = 1 (the objective is scale-invariant), optimise the rest
    scale = t * (t + 1) / 2.0  # DP-SGD's error: keeps the objective O(1)

    def fun(x):
        c = np.concatenate([[1.0], x])
        with np.errstate(over="ignore", invalid="ignore"):
            f, g = _error_and_grad(c, t)
        if not (math.isfinite(f) and np.all(np.isfinite(g))):
            return 1e30, np.zeros_like(x)  # an unstable filter: the line search backs off
        return f / scale, g[1:] / scale

    res = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    best = res.x if res.fun <= fun(x0)[0] else x0
    c = np.concatenate([[1.0], best])
    return tuple(float(v) for v in c / np.linalg.norm(c))


def optimal_coefficients(num_steps: int, bands: int) -> np.ndarray:
    """b-banded Toeplitz coefficients minimising :func:`prefix_sum_error` for a T-step run (‖c‖₂ = 1).

    Computed on the host with L-BFGS (from :func:`sqrt_coefficients`) and cached
    per ``(num_steps, bands)``; ``bands = 1`` is DP-SGD, ``(1.0,)``. Bands beyond
    ``num_steps`` cannot matter and are refused.

    Example:
      >>> c = optimal_coefficients(100, 4)
      >>> prefix_sum_error(c, 100) < prefix_sum_error([1.0], 100)
      True
    """
    t, b = _check_steps(num_steps), rules.check_bands(bands)
    if b > t:
        raise ValueError(f"bands={b} exceeds num_steps={t}; use bands <= num_steps (extra bands never act).")
    return np.asarray(_optimal(t, b))
