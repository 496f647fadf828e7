"""`--compile`: the U-Net's forward through torch.compile (inductor, static shapes), and with
`--cuda-graphs` each call replayed as CUDA graphs.

The U-Net is where nearly all the time of a run goes, and it is called with the same shapes at
every step, so it is the one module worth compiling; `dynamic=False` compiles one graph per
shape (a hires pass or another batch size adds one). Compilation happens at the first call
and takes from seconds to minutes; the images equal eager ones within float rounding.

`--cuda-graphs` (CUDA only) compiles in torch's "reduce-overhead" mode: after a warm-up call
the step's kernels are recorded once and each later call replays them with a single launch,
which removes the per-kernel launch cost that dominates small images on fast GPUs. A replay
writes its result into the same memory every time, so each call's output is copied out before
the next call can overwrite it (a latent, a few hundred KB). Not measured here yet: no GPU was
lent to this project's sessions (docs/benchmarks.md says how to measure it).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ldm_cli.core.errors import UserError


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


def check_compile(device: torch.device, cuda_graphs: bool = False) -> None:
    if cuda_graphs and device.type != "cuda":
        raise UserError(
            f"--cuda-graphs needs a CUDA device, not {device.type}; run without --cuda-graphs"
        )
    reason = unavailable_reason(device)
    if reason is not None:
        flag = "--cuda-graphs" if cuda_graphs else "--compile"
        raise UserError(f"{flag} cannot work here: {reason}; run without {flag}")


def compile_unet(
    unet: torch.nn.Module, device: torch.device, cuda_graphs: bool = False
) -> torch.nn.Module:
    """Replace `unet.forward` by its compiled version (in place; parameters and their names
    are untouched, so LoRA patching and offload hooks still see the same module)."""
    check_compile(device, cuda_graphs)
    eager = unet.forward
    if cuda_graphs:
        compiled = torch.compile(eager, dynamic=False, mode="reduce-overhead")
    else:
        compiled = torch.compile(eager, dynamic=False)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        try:
            if not cuda_graphs:
                return compiled(*args, **kwargs)
            # every call is a new step for torch's graph trees: the previous output has been
            # copied out, so its memory may be reused by this replay
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args, **kwargs).clone()
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile failed: {first}; run without --compile", 1) from e

    unet.forward = forward
    unet.eager_forward = eager  # the uncompiled forward, for comparisons
    unet.cuda_graphs = cuda_graphs
    return unet


def is_compiled(unet: torch.nn.Module) -> bool:
    return hasattr(unet, "eager_forward")
