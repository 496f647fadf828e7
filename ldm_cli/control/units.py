"""What a run asks of its ControlNets (`ControlSpec`, one per `--control`) and the checks on it,
before any weights are read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm_cli.core.errors import UserError

CONTROL_MODES = {
    "balanced": "Balanced",
    "controlnet": "ControlNet is more important",  # diffusers' guess mode
}
MAX_WEIGHT = 2.0
# A control image whose aspect ratio differs from the output's by more than this is refused
# rather than stretched.
ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet of a run: its file, the control image (a path or a PIL image), how to
    preprocess that image, the weight of its residuals, and the fractions of the run's steps
    between which it acts (diffusers' control_guidance_start/end)."""

    model: Path
    image: Path | Image.Image
    preprocess: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def acts_at(self, step: int, total: int) -> bool:
        """Whether it acts on step `step` of `total`, as diffusers' `controlnet_keep`."""
        return not (step / total < self.start or (step + 1) / total > self.end)


def check_spec(spec: ControlSpec, index: int = 0) -> None:
    """One-line UserErrors for values no run can use."""
    from ldm_cli.control.preprocessors import check_preprocessor

    where = f"--control {index + 1}" if index else "--control"
    check_preprocessor(spec.preprocess)
    if not (math.isfinite(spec.weight) and 0.0 <= spec.weight <= MAX_WEIGHT):
        raise UserError(f"{where}: weight must be within [0, {MAX_WEIGHT:g}], got {spec.weight}")
    for name in ("start", "end"):
        value = getattr(spec, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(f"{where}: {name} must be within [0, 1], got {value}")
    if spec.start >= spec.end:
        raise UserError(f"{where}: start ({spec.start}) must be before end ({spec.end})")
    if not Path(spec.model).exists():
        raise UserError(f"ControlNet not found: {spec.model}")
    if isinstance(spec.image, (str, Path)) and not Path(spec.image).is_file():
        raise UserError(f"control image not found: {spec.image}")


def check_control_mode(mode: str) -> None:
    if mode not in CONTROL_MODES:
        raise UserError(f"unknown control mode {mode!r}; choose one of {', '.join(CONTROL_MODES)}")


def fitted_control_image(image: Image.Image, width: int, height: int, name: str) -> Image.Image:
    """The control map at the output size, resized as diffusers does (Lanczos, both sides);
    refused when its aspect ratio is not the output's."""
    w, h = image.size
    if abs(math.log((w / h) / (width / height))) > ASPECT_TOLERANCE:
        raise UserError(
            f"control image {name} is {w}x{h}, of another aspect ratio than the {width}x{height} "
            "output; crop it to the same shape or change --width/--height"
        )
    if (w, h) == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def control_specs(value) -> tuple[ControlSpec, ...]:
    """The API's `control=`: None, one ControlSpec, or several."""
    if value is None:
        return ()
    if isinstance(value, ControlSpec):
        return (value,)
    specs = tuple(value)
    for spec in specs:
        if not isinstance(spec, ControlSpec):
            raise TypeError(f"control= takes ldm_cli.Control objects, got {type(spec).__name__}")
    return specs


def short_hash(path: Path) -> str:
    """A1111's old model hash (8 hex digits of sha256 over 64 KiB at 1 MiB), the one its
    ControlNet extension shows after a model's name."""
    import hashlib

    if Path(path).is_dir():
        return "00000000"
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def model_label(path: Path) -> str:
    path = Path(path)
    name = path.name if path.is_dir() else path.stem
    return f"{name} [{short_hash(path)}]"


def parameters(specs: tuple[ControlSpec, ...], mode: str) -> dict[str, str]:
    """The "ControlNet N" entries of A1111's ControlNet extension, one per unit."""
    out = {}
    for k, spec in enumerate(specs):
        fields = {
            "Module": spec.preprocess,
            "Model": model_label(spec.model),
            "Weight": f"{spec.weight:g}",
            "Resize Mode": "Just Resize",
            "Guidance Start": f"{spec.start:g}",
            "Guidance End": f"{spec.end:g}",
            "Control Mode": CONTROL_MODES[mode],
        }
        out[f"ControlNet {k}"] = ", ".join(f"{a}: {b}" for a, b in fields.items())  # quoted
    return out
