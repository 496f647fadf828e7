"""A1111's "hires fix": generate, upscale the decoded image, refine with img2img.

The upscaler is the embedded super-resolution network (`ldm-sr`, the default), `Lanczos`, or
an upscaler file (ESRGAN, RealESRGAN, 4x-UltraSharp, ...: `pipeline.tasks.image_upscaler`); the
network's output is resized (Lanczos) to the second pass's size.

The second pass uses the first pass's prompt, seed, sampler, scheduler and CFG; its schedule
has `steps` sigmas (default: the first pass's steps) of which it runs the last
`int(steps * strength)`, as img2img does. The PNG keeps the first pass's "Size" and adds
"Denoising strength", "Hires upscale", "Hires steps" and "Hires upscaler", as A1111 writes them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_steps

if TYPE_CHECKING:
    from ldm_cli.pipeline.base import Pipeline, Progress
    from ldm_cli.pipeline.request import Request

LANCZOS = "Lanczos"
EMBEDDED = "ldm-sr"
UPSCALER = EMBEDDED  # the default
MAX_SCALE = 8  # A1111 offers up to 4


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: the first pass's images upscaled `scale` times by `upscaler`
    ("ldm-sr", "Lanczos" or an upscaler file's path) and refined by img2img at `strength` for
    `steps` steps (None: the first pass's)."""

    scale: float = 2.0
    strength: float = 0.5
    steps: int | None = None  # None: the first pass's steps
    upscaler: str = UPSCALER

    def __post_init__(self) -> None:
        if not 1 <= self.scale <= MAX_SCALE:  # a hires fix does not shrink
            raise UserError(f"--hires-scale must be from 1 to {MAX_SCALE}, got {self.scale}")
        if not 0.0 <= self.strength <= 1.0:
            raise UserError(f"--hires-strength must be between 0 and 1, got {self.strength}")
        if self.steps is not None:
            check_steps(self.steps, "--hires-steps")
        if self.upscaler.lower() == LANCZOS.lower():
            object.__setattr__(self, "upscaler", LANCZOS)
        elif self.upscaler != EMBEDDED and not Path(self.upscaler).is_file():
            raise UserError(
                f"--hires-upscaler must be {EMBEDDED}, {LANCZOS} or an upscaler file; "
                f"no such file: {self.upscaler}"
            )

    @property
    def upscaler_name(self) -> str:
        """The name PNGs record: ldm-sr, Lanczos or the file's stem."""
        if self.upscaler in (EMBEDDED, LANCZOS):
            return self.upscaler
        return Path(self.upscaler).stem

    def size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """width and height times the scale, rounded to the nearest multiple of `multiple`."""
        w, h = (max(multiple, round(v * self.scale / multiple) * multiple) for v in (width, height))
        return w, h

    def parameters(self) -> dict[str, str]:
        from ldm_cli.core.pngmeta import format_number

        extra = {
            "Denoising strength": format_number(self.strength),
            "Hires upscale": format_number(self.scale),
        }
        if self.steps is not None:
            extra["Hires steps"] = str(self.steps)
        extra["Hires upscaler"] = self.upscaler_name
        return extra

    def apply(
        self,
        pipe: Pipeline,
        pairs: list[tuple[Request, Image.Image]],
        progress: Progress | None = None,
    ) -> list[tuple[Request, Image.Image]]:
        """The first pass's (request, image) pairs refined at the upscaled size, as one batch."""
        from ldm_cli.pipeline.tasks.img2img import render_img2img

        if not pairs:
            return []
        head = pairs[0][0]
        width, height = self.size(head.width, head.height, pipe.size_multiple)
        second = [
            replace(req, width=width, height=height, steps=self.steps or req.steps)
            for req, _ in pairs
        ]
        upscaled = self.upscale([image for _, image in pairs], (width, height), pipe.device)
        refined = render_img2img(pipe, second, upscaled, self.strength, progress)
        return [(req, image) for (req, _), (_, image) in zip(pairs, refined, strict=True)]

    def network(self, device):
        """The upscaler network on `device` (None for Lanczos), loaded once per process: the
        CLI calls it before the first pass so that a bad file fails before any sampling."""
        if self.upscaler == LANCZOS:
            return None
        import torch

        device = torch.device(device)
        key = (self.upscaler, 2 if self.scale <= 2 else 4, str(device))
        if key not in _NETWORKS:
            from ldm_cli.pipeline.tasks.image_upscaler import load_embedded_upscaler, load_upscaler

            if self.upscaler == EMBEDDED:
                network = load_embedded_upscaler(self.scale, device)
            else:
                network = load_upscaler(self.upscaler, device)
            _NETWORKS.clear()  # one at a time: they are small, but files may not be
            _NETWORKS[key] = network.to(device, half=device.type == "cuda")
        return _NETWORKS[key]

    def upscale(self, images: list[Image.Image], size: tuple[int, int], device) -> list:
        """The first pass's images at the second pass's size."""
        network = self.network(device)
        if network is None:
            return [image.resize(size, Image.Resampling.LANCZOS) for image in images]
        from ldm_cli.pipeline.tasks.image_upscaler import upscale_to

        return [upscale_to(network, image, size) for image in images]


_NETWORKS: dict = {}


def hires_from_parameters(extra: dict[str, str]) -> HiresFix | None:
    """The hires fix recorded in a PNG's parameters (A1111's keys), or None."""
    if "Hires upscale" not in extra:
        return None
    upscaler = extra.get("Hires upscaler", LANCZOS)  # written since the first hires fix
    if upscaler not in (EMBEDDED, LANCZOS):
        print(
            f"warning: the PNG's hires upscaler {upscaler!r} is not known here; {UPSCALER} is "
            "used, so the image will differ (--hires-upscaler FILE names its file)",
            file=sys.stderr,
        )
        upscaler = UPSCALER
    try:
        return HiresFix(
            scale=float(extra["Hires upscale"]),
            strength=float(extra.get("Denoising strength", 0.5)),
            steps=int(extra["Hires steps"]) if int(extra.get("Hires steps", 0)) else None,
            upscaler=upscaler,
        )
    except ValueError:
        raise UserError("bad Hires values in the parameters text") from None
