"""Linear multistep (k-diffusion's sample_lms): Adams-Bashforth in sigma on uneven steps."""

from __future__ import annotations

import torch

from ldm_cli.samplers.common import Callback, Generators, Model, SigmaRun


def lagrange_weight(nodes: list[float], j: int, start: float, end: float) -> float:
    """Integral from start to end of the Lagrange basis polynomial of nodes[j].

    Exact: the polynomial is expanded in u = tau - start, which keeps the powers small
    (k-diffusion integrates the same polynomial numerically with scipy's quad).
    """
    coeffs = [1.0]  # low to high powers of u
    for k, node in enumerate(nodes):
        if k == j:
            continue
        shift, scale = node - start, 1.0 / (nodes[j] - node)
        grown = [0.0] * (len(coeffs) + 1)
        for power, c in enumerate(coeffs):
            grown[power + 1] += c * scale
            grown[power] -= c * shift * scale
        coeffs = grown
    h = end - start
    return sum(c * h ** (power + 1) / (power + 1) for power, c in enumerate(coeffs))


def sample_lms(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    order: int = 4,
    **extra,
) -> torch.Tensor:
    """Order-4 linear multistep on dx/dsigma; the first steps use the history they have."""
    run = SigmaRun(sigmas)
    slopes: list[torch.Tensor] = []  # oldest first
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        slopes.append((x - x0) / sigma)
        if len(slopes) > order:
            slopes.pop(0)
        nodes = [run.values[i - k] for k in range(len(slopes))]  # newest first
        for j, slope in enumerate(reversed(slopes)):
            x = x + slope * lagrange_weight(nodes, j, sigma, sigma_next)
        if callback is not None:
            callback(i, x, x0)
    return x
