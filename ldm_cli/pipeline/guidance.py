"""Classifier-free guidance as a denoiser closure: samplers never see prompts or CFG."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_cli.text.batch import GuidanceContext, PromptBatch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepClock:
    """The sampler step that the next model evaluation belongs to.

    The pipeline advances it from the samplers' per-step callback, so a sampler that makes
    two evaluations per step (heun, dpm2, dpmpp_sde) gets the same step's conditioning for
    both, and samplers stay unaware of prompts. (A1111 instead counts evaluations against a
    schedule built for twice the steps; the switch points agree up to rounding.)
    """

    def __init__(self) -> None:
        self.step = 0

    def finished(self, step: int) -> None:
        self.step = step + 1


def cfg_denoiser(
    denoiser: Callable[..., torch.Tensor],
    cond: torch.Tensor | PromptBatch,
    uncond: torch.Tensor | PromptBatch | None,
    scale: float,
    clock: StepClock | None = None,
    rescale: float = 0.0,
) -> Denoise:
    """`model(x, sigma) -> x0` guided by `scale`; all prompt rows share one batched call.

    `cond` and `uncond` are contexts [B, L, D] or PromptBatch objects: conditioning that
    changes with the step (read at `clock.step`) and several weighted sub-prompts per image
    (AND), combined as A1111 does: x0 = u + sum_k w_k * scale * (c_k - u). One sub-prompt of
    weight 1 is ordinary CFG.

    Guidance is applied to x0, which for a fixed (x, sigma) is an affine function of the
    network output, so it equals guidance on eps or v exactly (up to rounding).
    With `scale == 1` and plain prompts the unconditional pass is skipped.
    `rescale` > 0 applies diffusers' guidance rescale (`--rescale-cfg`,
    ldm_cli.pipeline.cfg_rescale).
    """
    if isinstance(cond, torch.Tensor):
        cond = PromptBatch.fixed(cond)
    if isinstance(uncond, torch.Tensor):
        uncond = PromptBatch.fixed(uncond)
    if uncond is None and not cond.plain_weights:
        raise ValueError("weighted sub-prompts (AND) need the unconditional prediction")
    clock = clock or StepClock()

    if uncond is None or (scale == 1.0 and cond.plain_weights):
        contexts = GuidanceContext(cond, None)
        return lambda x, sigma: denoiser(x, _batch_sigma(sigma, x), context=contexts.at(clock.step))

    contexts = GuidanceContext(cond, uncond)
    weights = cond.weights()
    blocks = 1 + len(weights)

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _batch_sigma(sigma, x)
        context = contexts.at(clock.step)
        x0 = denoiser(torch.cat([x] * blocks), torch.cat([s] * blocks), context=context)
        x0_uncond, *x0_conds = x0.chunk(blocks)
        out = combine(x0_uncond, x0_conds, weights, scale)
        if rescale:
            from ldm_cli.pipeline.cfg_rescale import rescale_x0

            reference = combine(x0_uncond, x0_conds, weights, 1.0)  # the conditional x0
            prediction = getattr(denoiser, "prediction", "eps")
            out = rescale_x0(out, reference, x, s, rescale, prediction)
        return out

    return guided


def combine(
    x0_uncond: torch.Tensor,
    x0_conds: list[torch.Tensor],
    weights: list[list[float]],
    scale: float,
) -> torch.Tensor:
    """x0_uncond + sum_k (x0_conds[k] - x0_uncond) * weights[k] * scale, per image."""
    out = x0_uncond
    for x0_cond, row_weights in zip(x0_conds, weights, strict=True):
        if len(set(row_weights)) == 1:
            factor = row_weights[0] * scale
        else:
            factors = [w * scale for w in row_weights]
            factor = torch.tensor(factors, dtype=x0_cond.dtype, device=x0_cond.device)
            factor = factor.view(-1, *[1] * (x0_cond.ndim - 1))
        out = out + (x0_cond - x0_uncond) * factor
    return out


def _batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
