"""Choosing the device and dtype for `--device auto` / `--dtype auto`."""

from __future__ import annotations

import torch

from ldm_cli.core.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    if name == "mps" and not (torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from e


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on GPUs; fp32 on CPUs, whose half-precision matmuls are far slower than fp32."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[name]
