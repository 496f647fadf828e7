"""A1111's "hires fix": generate, upscale the decoded image (Lanczos), refine with img2img.

The second pass uses the first pass's prompt, seed, sampler, scheduler and CFG; its schedule
has `steps` sigmas (default: the first pass's steps) of which it runs the last
`int(steps * strength)`, as img2img does. The PNG keeps the first pass's "Size" and adds
"Denoising strength", "Hires upscale", "Hires steps" and "Hires upscaler", as A1111 writes them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from .errors import UserError
from .limits import check_steps

if TYPE_CHECKING:
    from .pipeline import Pipeline, Progress, Request

UPSCALER = "Lanczos"
MAX_SCALE = 8  # A1111 offers up to 4


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: the first pass's images upscaled `scale` times (Lanczos) and refined
    by img2img at `strength` for `steps` steps (None: the first pass's)."""

    scale: float = 2.0
    strength: float = 0.5
    steps: int | None = None  # None: the first pass's steps

    def __post_init__(self) -> None:
        if not 1 <= self.scale <= MAX_SCALE:  # a hires fix does not shrink
            raise UserError(f"--hires-scale must be from 1 to {MAX_SCALE}, got {self.scale}")
        if not 0.0 <= self.strength <= 1.0:
            raise UserError(f"--hires-strength must be between 0 and 1, got {self.strength}")
        if self.steps is not None:
            check_steps(self.steps, "--hires-steps")

    def size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """width and height times the scale, rounded to the nearest multiple of `multiple`."""
        w, h = (max(multiple, round(v * self.scale / multiple) * multiple) for v in (width, height))
        return w, h

    def parameters(self) -> dict[str, str]:
        from .pngmeta import format_number

        extra = {
            "Denoising strength": format_number(self.strength),
            "Hires upscale": format_number(self.scale),
        }
        if self.steps is not None:
            extra["Hires steps"] = str(self.steps)
        extra["Hires upscaler"] = UPSCALER
        return extra

    def apply(
        self,
        pipe: Pipeline,
        pairs: list[tuple[Request, Image.Image]],
        progress: Progress | None = None,
    ) -> list[tuple[Request, Image.Image]]:
        """The first pass's (request, image) pairs refined at the upscaled size, as one batch."""
        from .img2img import render_img2img

        if not pairs:
            return []
        head = pairs[0][0]
        width, height = self.size(head.width, head.height, pipe.size_multiple)
        second = [
            replace(req, width=width, height=height, steps=self.steps or req.steps)
            for req, _ in pairs
        ]
        upscaled = [image.resize((width, height), Image.Resampling.LANCZOS) for _, image in pairs]
        refined = render_img2img(pipe, second, upscaled, self.strength, progress)
        return [(req, image) for (req, _), (_, image) in zip(pairs, refined, strict=True)]


def hires_from_parameters(extra: dict[str, str]) -> HiresFix | None:
    """The hires fix recorded in a PNG's parameters (A1111's keys), or None."""
    if "Hires upscale" not in extra:
        return None
    upscaler = extra.get("Hires upscaler", UPSCALER)
    if upscaler != UPSCALER:
        print(
            f"warning: the PNG's hires upscaler {upscaler!r} is not available here; "
            f"{UPSCALER} is used, so the image will differ",
            file=sys.stderr,
        )
    try:
        return HiresFix(
            scale=float(extra["Hires upscale"]),
            strength=float(extra.get("Denoising strength", 0.5)),
            steps=int(extra["Hires steps"]) if int(extra.get("Hires steps", 0)) else None,
        )
    except ValueError:
        raise UserError("bad Hires values in the parameters text") from None
