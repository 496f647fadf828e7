"""UniPC (Zhao et al. 2023), data prediction, B(h) = expm1(-h) ("bh2"): diffusers' default.

In sigma space with lambda = -log(sigma) and h = lambda_t - lambda_s0, the predictor UniP-p
is x_t = (sigma_t / sigma_s0) x - expm1(-h) m0 - B(h) sum_k rho_k D_k, with m the x0
predictions, r_k = (lambda_sk - lambda_s0) / h and D_k = (m_k - m0) / r_k over the p - 1
earlier points. The corrector UniC-p redoes the last step once the model has been evaluated at
its result, adding D_t = m_t - m0 (no extra model call). The weights rho solve R rho = b
with R the Vandermonde rows r^(i-1) (r over the ratios and 1) and
b_i = i! (-h) phi_(i+1)(-h) / B(h), phi the exponential-integrator functions; UniP-2 and UniC-1
use rho = 1/2. The last step drops to first order (lower_order_final), and a step to sigma 0
returns the x0 prediction, the limit of the first-order update.
"""

from __future__ import annotations

import math

import torch

from ldm_cli.samplers.common import Callback, Generators, Model, SigmaRun


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny UniPC systems."""
    n = len(rhs)
    rows = [list(row) + [value] for row, value in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    solution = [0.0] * n
    for r in reversed(range(n)):
        known = sum(rows[r][c] * solution[c] for c in range(r + 1, n))
        solution[r] = (rows[r][n] - known) / rows[r][r]
    return solution


def _weights(h: float, ratios: list[float], order: int) -> tuple[list[list[float]], list[float]]:
    """The Vandermonde rows R (over ratios + [1]) and the right-hand side b, both of size order."""
    hh = -h  # data prediction integrates e^(-h)
    b_h = math.expm1(hh)
    h_phi = math.expm1(hh) / hh - 1  # hh * phi_2(hh); becomes hh * phi_(i+1)(hh) in the loop
    factorial = 1
    nodes = [*ratios, 1.0]
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in nodes])
        rhs.append(h_phi * factorial / b_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    return rows, rhs


def _history_terms(lambdas, x0s, lambda_s0, h, order):
    """Ratios r_k and differences D_k for the order - 1 points before s0 (newest first)."""
    ratios, diffs = [], []
    for k in range(1, order):
        r = (lambdas[-(k + 1)] - lambda_s0) / h
        ratios.append(r)
        diffs.append((x0s[-(k + 1)] - x0s[-1]) / r)
    return ratios, diffs


def sample_unipc(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    order: int = 2,
    **extra,
) -> torch.Tensor:
    """UniPC-bh2 multistep predictor-corrector, one model call per step (order 2 default)."""
    run = SigmaRun(sigmas)
    n = run.steps
    lambdas: list[float] = []  # of the points whose x0 is in x0s, oldest first
    x0s: list[torch.Tensor] = []
    x_before = None  # the sample the last predictor started from
    last_order = 0
    for i in range(n):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        lambda_i = -math.log(sigma)
        if x_before is not None:
            x = _correct(x_before, x0, lambdas, x0s, lambda_i, last_order)
        lambdas.append(lambda_i)
        x0s.append(x0)
        if len(x0s) > order:
            lambdas.pop(0)
            x0s.pop(0)
        last_order = min(order, n - i, len(x0s))  # warm-up and lower_order_final
        x_before = x
        x = x0 if sigma_next == 0 else _predict(x, lambdas, x0s, -math.log(sigma_next), last_order)
        if callback is not None:
            callback(i, x, x0)
    return x


def _predict(x, lambdas, x0s, lambda_t, order):
    lambda_s0, m0 = lambdas[-1], x0s[-1]
    h = lambda_t - lambda_s0
    ratios, diffs = _history_terms(lambdas, x0s, lambda_s0, h, order)
    out = x * math.exp(-h) - m0 * math.expm1(-h)
    if diffs:
        if order == 2:
            rhos = [0.5]
        else:
            rows, rhs = _weights(h, ratios, order)
            rhos = _solve([row[:-1] for row in rows[:-1]], rhs[:-1])
        b_h = math.expm1(-h)
        for rho, diff in zip(rhos, diffs, strict=True):
            out = out - diff * (b_h * rho)
    return out


def _correct(x_before, x0_t, lambdas, x0s, lambda_t, order):
    lambda_s0, m0 = lambdas[-1], x0s[-1]
    h = lambda_t - lambda_s0
    ratios, diffs = _history_terms(lambdas, x0s, lambda_s0, h, order)
    if order == 1:
        rhos = [0.5]
    else:
        rows, rhs = _weights(h, ratios, order)
        rhos = _solve(rows, rhs)
    b_h = math.expm1(-h)
    out = x_before * math.exp(-h) - m0 * math.expm1(-h)
    for rho, diff in zip(rhos[:-1], diffs, strict=True):
        out = out - diff * (b_h * rho)
    return out - (x0_t - m0) * (b_h * rhos[-1])
