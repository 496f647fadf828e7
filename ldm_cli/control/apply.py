"""ControlNet residuals at each U-Net call of a run: the units of one run, and the U-Net call
that adds their summed residuals (diffusers' MultiControlNetModel: each weighted, then summed).

The wrapper sits outside every other U-Net wrapper, so a ControlNet sees the latents as the
U-Net's first four channels (before an inpainting model's mask channels are added), the same
timestep, text context and SDXL size vector. "controlnet" mode is diffusers' guess mode: the
ControlNets run on the conditional rows only, their residuals scaled from 0.1 (first skip) to 1
(middle) and zero for the unconditional rows, so the control wins over the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.control.files import build_adapter, build_controlnet, read_control_file
from ldm_cli.control.preprocessors import preprocess
from ldm_cli.control.units import ControlSpec, fitted_control_image
from ldm_cli.core.config import UNetConfig
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import open_image
from ldm_cli.models.controlnet import ControlNet
from ldm_cli.models.t2i_adapter import T2IAdapter


@dataclass(frozen=True, eq=False)
class ControlUnit:
    net: ControlNet
    hint: torch.Tensor  # [1, 3, H, W] in [0, 1], on the model's device and dtype
    spec: ControlSpec


class ControlNets:
    """The ControlNets and T2I-Adapters a pipeline has built, one per file, kept between runs."""

    def __init__(self) -> None:
        self._nets: dict[Path, ControlNet | T2IAdapter] = {}

    def get(self, path: Path, base: UNetConfig, device, dtype, factor: int = 8):
        """The model of the file at `path` for a U-Net of config `base` whose latents are
        1/`factor` of the image."""
        key = Path(path).resolve()
        if key not in self._nets:
            file = read_control_file(path)
            if file.is_adapter:
                self._nets[key] = build_adapter(file, base, factor, device, dtype)
            else:
                self._nets[key] = build_controlnet(file, base, device, dtype)
        return self._nets[key]

    def release(self) -> None:
        self._nets.clear()


def control_map(spec: ControlSpec, width: int, height: int) -> Image.Image:
    """The spec's control image, preprocessed, at the output size."""
    image = open_image(spec.image, "control image")
    name = Path(spec.image).name if isinstance(spec.image, (str, Path)) else "image"
    return fitted_control_image(preprocess(image, spec.preprocess), width, height, name)


def control_units(
    specs: tuple[ControlSpec, ...],
    nets: ControlNets,
    base: UNetConfig,
    size: tuple[int, int],
    device,
    dtype,
    factor: int = 8,
) -> list[ControlUnit]:
    """The units of one run at output `size`, for a model whose latents are 1/`factor` of it."""
    width, height = size
    units = []
    for spec in specs:
        net = nets.get(spec.model, base, device, dtype, factor)
        if net.hint_factor != factor:
            raise UserError(
                f"{Path(spec.model).name} reads control images at 1/{net.hint_factor} of their "
                f"size; this model's latents are 1/{factor} of the image's"
            )
        pixels = torch.from_numpy(_array(control_map(spec, width, height)))
        hint = pixels.permute(2, 0, 1)[None].to(device=device, dtype=dtype)
        units.append(ControlUnit(net, hint, spec))
    return units


def _array(image: Image.Image):
    import numpy as np

    return np.asarray(image, dtype=np.float32) / 255.0


Split = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def with_control(
    unet_fn: Callable[..., torch.Tensor],
    units: list[ControlUnit],
    step: Callable[[], int],
    total: int,
    split: Split = lambda context: (context, None),
    mode: str = "balanced",
    images: int = 1,
) -> Callable[..., torch.Tensor]:
    """`unet_fn` with the units' residuals. `step()` is the run's current step of `total`;
    `split` turns the conditioning rows into the U-Net's (context, y) (SDXL packs y into them);
    `images` is the batch's image count: the CFG batch's rows come in blocks of it, the
    unconditional block first."""
    if not units:
        return unet_fn
    nets = [u for u in units if not isinstance(u.net, T2IAdapter)]
    # T2I-Adapters see the control image only: their features are computed once per run and
    # given to every row (diffusers' StableDiffusionAdapterPipeline)
    adapters = [
        (u, [f * u.spec.weight for f in u.net(u.hint)])
        for u in units
        if isinstance(u.net, T2IAdapter)
    ]

    def call(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **cond) -> torch.Tensor:
        active = [u for u in nets if u.spec.acts_at(step(), total)]
        features = _summed(
            [f for u, f in adapters if u.spec.acts_at(step(), total)], expand=z.shape[0]
        )
        if features is not None:
            cond["adapter"] = features
        if not active:
            return unet_fn(z, t, context=context, **cond)
        guess = mode == "controlnet" and z.shape[0] > images
        rows = slice(images, None) if guess else slice(None)  # guess mode: conditional rows
        inner, y = split(context[rows])
        if "y" in cond:
            y = cond["y"][rows]
        runs = []
        for unit in active:
            residuals = run_unit(unit, z[rows], t.reshape(-1).expand(z.shape[0])[rows], inner, y)
            scales = _scales(len(residuals), unit.spec.weight, guess)
            runs.append([r * s for r, s in zip(residuals, scales, strict=True)])
        summed = _summed(runs)
        if guess:
            summed = [torch.cat([torch.zeros_like(r[:images]), r]) for r in summed]
        return unet_fn(z, t, context=context, control=summed, **cond)

    return call


def _summed(runs: list[list[torch.Tensor]], expand: int | None = None):
    """Element-wise sums of several residual lists (None for none), expanded to `expand` rows."""
    if not runs:
        return None
    out = [sum(parts[1:], parts[0]) for parts in zip(*runs, strict=True)]
    if expand is not None:
        out = [r.expand(expand, *r.shape[1:]) for r in out]
    return out


def run_unit(unit: ControlUnit, z, t, context, y) -> list[torch.Tensor]:
    dtype = unit.hint.dtype
    hint = unit.hint.expand(z.shape[0], -1, -1, -1)
    if y is not None and y.is_floating_point():
        y = y.to(dtype)
    return unit.net(z.to(dtype), hint, t, context.to(dtype), y)


def _scales(count: int, weight: float, guess: bool) -> list[float]:
    if not guess:
        return [weight] * count
    # diffusers: torch.logspace(-1, 0, count) over the skips then the middle
    return [weight * float(s) for s in torch.logspace(-1, 0, count)]
