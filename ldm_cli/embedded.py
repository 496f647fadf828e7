"""Where the embedded default model lives."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
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


def default_upscaler_path() -> Path:
    """The embedded x4 upscaler (`ldm upscale` without --model)."""
    env = os.environ.get("LDM_DEFAULT_UPSCALER")
    path = Path(env) if env else WEIGHTS_DIR / UPSCALER_NAME
    if not path.exists():
        raise UserError(
            f"no --model given and the embedded upscaler is missing ({path}); "
            "pass --model X4_UPSCALER.safetensors"
        )
    return path
