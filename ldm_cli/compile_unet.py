"""`--compile`: the U-Net's forward through torch.compile (inductor, default mode, static shapes).

The U-Net is where nearly all the time of a run goes, and it is called with the same shapes at
every step, so it is the one module worth compiling; `dynamic=False` compiles one graph per
shape (a hires pass or another batch size adds one). Compilation happens at the first call
and takes from seconds to minutes; the images equal eager ones within float rounding.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .errors import UserError


def unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile's inductor backend cannot run on `device` here, or None."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "inductor needs the triton package to compile for CUDA, and it is not installed"
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:  # torch raises InvalidCxxCompiler; other versions may differ
            return "inductor needs a C++ compiler on the CPU (g++ or $CXX) and none works"
    return None


def check_compile(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise UserError(f"--compile cannot work here: {reason}; run without --compile")


def compile_unet(unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Replace `unet.forward` by its compiled version (in place; parameters and their names
    are untouched, so LoRA patching and offload hooks still see the same module)."""
    check_compile(device)
    eager = unet.forward
    compiled = torch.compile(eager, dynamic=False)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile failed: {first}; run without --compile", 1) from e

    unet.forward = forward
    unet.eager_forward = eager  # the uncompiled forward, for comparisons
    return unet


def is_compiled(unet: torch.nn.Module) -> bool:
    return hasattr(unet, "eager_forward")
