"""What decides an image besides the model, and the seed + k rule of multi-image runs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ldm_cli.core.limits import check_count, check_seed, check_side, check_steps, random_seed
from ldm_cli.samplers import SAMPLERS

if TYPE_CHECKING:
    from ldm_cli.control.units import ControlSpec


@dataclass(frozen=True)
class Request:
    """Everything that decides an image, besides the model."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 7.5
    seed: int = 0
    sampler: str = "euler_a"
    scheduler: str = "auto"
    width: int = 512
    height: int = 512
    rescale_cfg: float = 0.0  # guidance rescale PHI (--rescale-cfg; ldm_cli.pipeline.cfg_rescale)
    deep_cache: int = 0  # reuse deep U-Net features N-1 calls in N (--deep-cache; 0, 1: off)
    token_merging: float = 0.0  # ratio of merged self-attention tokens (--token-merging)
    # ControlNets (--control ...; ldm_cli.control) and how their residuals weigh against the
    # prompt: "balanced" or "controlnet" (diffusers' guess mode)
    control: tuple[ControlSpec, ...] = ()
    control_mode: str = "balanced"
    # FLUX dev's distilled guidance (--guidance): an input of the model, not a second pass
    guidance: float | None = None
    # the noise share of stochastic samplers (--eta): ancestral eta, tcd's gamma; None: theirs
    eta: float | None = None

    @property
    def spacing(self) -> str:
        return (
            SAMPLERS[self.sampler].default_spacing if self.scheduler == "auto" else self.scheduler
        )


# the samplers with an eta: the share of each step's noise drawn afresh
ETA_SAMPLERS = ("euler_a", "dpmpp_sde", "dpmpp_2m_sde", "tcd")


def check_request(req: Request, size_multiple: int) -> None:
    """A one-line UserError for settings no model can render, or a size this one cannot
    (width and height must be multiples of `size_multiple`)."""
    from ldm_cli.core.errors import UserError
    from ldm_cli.runtime.deep_cache import check_deep_cache
    from ldm_cli.runtime.token_merging import check_token_merging
    from ldm_cli.samplers.schedules import SPACINGS

    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(req, name), str):
            raise UserError(f"{name} must be text, got {getattr(req, name)!r}")
    check_seed(req.seed, name="seed")
    check_steps(req.steps, name="steps")
    check_side(req.width, "width")
    check_side(req.height, "height")
    m = size_multiple
    if req.width % m or req.height % m:
        raise UserError(
            f"size {req.width}x{req.height} is not supported: width and height must be "
            f"positive multiples of {m} for this model"
        )
    if not abs(req.cfg) < float("inf"):  # NaN or inf would only give a NaN image
        raise UserError(f"--cfg must be a finite number, got {req.cfg}")
    if req.eta is not None:
        if req.sampler not in ETA_SAMPLERS:
            raise UserError(
                f"--eta is for the samplers that add noise ({', '.join(ETA_SAMPLERS)}), "
                f"not {req.sampler}"
            )
        if not 0.0 <= req.eta <= 1.0:
            raise UserError(f"--eta must be within [0, 1], got {req.eta}")
    if not 0.0 <= req.rescale_cfg <= 1.0:
        raise UserError(f"--rescale-cfg must be within [0, 1], got {req.rescale_cfg}")
    check_deep_cache(req.deep_cache)
    if req.control:
        from ldm_cli.control.units import check_control_mode, check_spec

        for k, spec in enumerate(req.control):
            check_spec(spec, k)
        check_control_mode(req.control_mode)
        if req.deep_cache > 1:
            raise UserError(
                "--deep-cache does not work with ControlNets (their residuals reach every block)"
            )
    check_token_merging(req.token_merging)
    if req.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {req.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if req.scheduler != "auto" and req.scheduler not in SPACINGS:
        raise UserError(
            f"unknown scheduler {req.scheduler!r}; choose one of auto, {', '.join(SPACINGS)}"
        )


def seeded_batches(base: Request, num_images: int, batch_size: int) -> list[list[Request]]:
    """Image k of a run uses seed + k, whatever the batch size it is rendered in."""
    check_count(num_images, "num_images")
    check_count(batch_size, "batch_size")
    check_seed(base.seed, num_images, name="seed")
    reqs = [replace(base, seed=base.seed + k) for k in range(num_images)]
    return [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]


__all__ = ["Request", "check_request", "random_seed", "seeded_batches"]
