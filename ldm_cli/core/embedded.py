"""Where the embedded default model lives."""

from __future__ import annotations

import os
from pathlib import Path

from ldm_cli.core.errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_NAME = "ldm-shapes.safetensors"


def default_model_path() -> Path:
    env = os.environ.get("LDM_DEFAULT_MODEL")
    path = Path(env) if env else WEIGHTS_DIR / DEFAULT_NAME
    if not path.exists():
        raise UserError(
            f"no --model given and the embedded default model is missing ({path}); "
            "pass --model CKPT.safetensors"
        )
    return path


UPSCALER_NAME = "ldm-shapes-x4.safetensors"


def _upscaler_file() -> Path:
    env = os.environ.get("LDM_DEFAULT_UPSCALER")
    return Path(env) if env else WEIGHTS_DIR / UPSCALER_NAME


def default_upscaler_path() -> Path:
    """The embedded x4 diffusion upscaler (`ldm upscale --diffusion`)."""
    path = _upscaler_file()
    if not path.exists():
        raise UserError(
            f"the embedded x4 diffusion upscaler is missing ({path}); "
            "pass --model X4_UPSCALER.safetensors"
        )
    return path


def is_embedded_upscaler(path: Path | str | None) -> bool:
    """Whether `path` is the embedded x4 diffusion upscaler's file (as `--diffusion` loads it)."""
    try:
        return path is not None and Path(path).resolve() == _upscaler_file().resolve()
    except OSError:
        return False


# The embedded super-resolution networks (`ldm upscale` and the hires fix by default).
SR_NAMES = {2: "ldm-sr-x2.safetensors", 4: "ldm-sr-x4.safetensors"}


def embedded_sr_paths() -> dict[int, Path]:
    return {scale: WEIGHTS_DIR / name for scale, name in SR_NAMES.items()}


def embedded_sr_path(scale: int) -> Path:
    """The embedded x2 or x4 network (LDM_SR_X2 / LDM_SR_X4 name another file)."""
    env = os.environ.get(f"LDM_SR_X{scale}")
    path = Path(env) if env else embedded_sr_paths()[scale]
    if not path.exists():
        raise UserError(f"the embedded x{scale} upscaler is missing ({path}); pass --upscaler FILE")
    return path
