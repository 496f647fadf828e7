"""The SDXL refiner as a second pass (``--refiner CKPT --refiner-switch 0.8``).

SDXL's "ensemble of expert denoisers": the base denoises the noisy part of the schedule and
the refiner, trained on the low-noise timesteps only, the rest. The switch is a point of the
timestep range, as diffusers' ``denoising_end`` / ``denoising_start``: the base runs the steps
whose timestep is at least ``round((1 - switch) * 1000)`` (the cutoff, 200 for 0.8), the refiner
those below it. With the default "normal" spacing (timesteps evenly spaced from 999 to 0)
that is the first 80% of the steps.

Both models run inside **one** sampler run: the base pipeline's U-Net wrapper
(:class:`~ldm_cli.pipeline.tasks.sdxl_packed_rows.PackedConditioningUNet`) sends every call below
the cutoff to the refiner's U-Net, with the refiner's own conditioning (its bigG features, pooled
output and aesthetic score: 6 for the prompt, 2.5 for the negative prompt, diffusers' defaults),
which every conditioning row carries beside the base's
(:func:`~ldm_cli.pipeline.tasks.sdxl_packed_rows.merge_rows`; built from the same prompt syntax,
:mod:`ldm_cli.pipeline.conditioning`). Samplers stay plain functions over ``model(x, sigma) -> x0``
and never know that the model changed. Compared with two sampler calls on the split sigma list, one
run keeps the whole sampler state of a base-only run: the ancestral noise stream of every step
(also the SDE samplers' noise, which is drawn per sigma interval of the whole run), and the
multistep history across the switch. For the single-step samplers (euler, euler_a, heun, ddpm, ...)
this is exactly what diffusers computes with one generator for its base pipeline with
``denoising_end=switch`` followed by its img2img refiner pipeline with ``denoising_start=switch``;
for multistep samplers (dpmpp_2m, lms, unipc) diffusers restarts the history at the switch, one run
does not.

The image is decoded by the base's VAE (the SDXL base and refiner ship the same one).
"""

from __future__ import annotations

from ldm_cli.core.errors import UserError
from ldm_cli.pipeline.base import Pipeline
from ldm_cli.pipeline.tasks.handover import DEFAULT_SWITCH, Refiner, check_switch
from ldm_cli.pipeline.tasks.sdxl import SDXLPipeline


def attach_refiner(base: Pipeline, refiner: Pipeline, switch: float = DEFAULT_SWITCH) -> Pipeline:
    """Make every run of `base` (an SDXL base pipeline) hand over to `refiner` at `switch`.

    Returns `base`; set ``base.refiner = None`` to run the base alone again.
    """
    check_switch(switch)
    if not isinstance(base, SDXLPipeline) or base.is_refiner:
        raise UserError(f"--refiner needs an SDXL base model; {base.name} is {base.config.family}")
    if not isinstance(refiner, SDXLPipeline) or not refiner.is_refiner:
        raise UserError(
            f"{refiner.name} is not an SDXL refiner checkpoint ({refiner.config.family})"
        )
    if base.is_inpainting:
        raise UserError("a refiner cannot follow a 9-channel inpainting model")
    mismatches = [
        what
        for what, a, b in (
            ("latent channels", base.config.unet.out_channels, refiner.config.unet.out_channels),
            ("VAE downscale", base.latent_factor, refiner.latent_factor),
            ("noise schedule", base.config.schedule, refiner.config.schedule),
            ("prediction type", base.config.prediction, refiner.config.prediction),
            ("device", base.device, refiner.device),
            ("dtype", base.dtype, refiner.dtype),
        )
        if a != b
    ]
    if mismatches:
        raise UserError(
            f"{refiner.name} cannot refine {base.name}: they differ in {', '.join(mismatches)}"
        )
    base.refiner = Refiner(refiner, switch)
    return base


def refiner_step_count(base: Pipeline, steps: int, sampler: str, scheduler: str) -> int:
    """How many of a run's steps the attached refiner takes (0 without one)."""
    from ldm_cli.pipeline.request import Request

    refiner = getattr(base, "refiner", None)
    if refiner is None:
        return 0
    req = Request("", steps=steps, sampler=sampler, scheduler=scheduler)
    _, timesteps = base.sigmas(req)
    return int((timesteps < refiner.cutoff).sum())
