"""Loading with `--compile` and `--offload` applied (see ldm_cli.runtime.compile and
ldm_cli.runtime.offload)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.pipeline.model_options import load_with_options
from ldm_cli.runtime.offload import apply_offload, check_offload_device


def load_prepared(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    prediction: str | None = None,
    clip_skip: int | None = None,
    *,
    compile: bool = False,
    offload: str = "none",
    low_memory: bool | None = None,
    cuda_graphs: bool = False,
) -> tuple[LatentDiffusion, CheckpointHeader]:
    """`load_with_options`, then the U-Net compiled and the offload hooks installed. Option
    errors (a CPU device for offloading, no compiler) come before the weights are read.
    `low_memory`: an fp16/bf16 file's large U-Net weights stay in it, widened to fp32 per call
    on the CPU (models/narrow_weights); None: so unless the U-Net is compiled or offloaded.
    `cuda_graphs` compiles the U-Net to replay CUDA graphs (implies `compile`)."""
    check_offload_device(offload, device)
    if cuda_graphs and offload != "none":
        raise UserError(
            "--cuda-graphs does not work with --offload (a graph replays on the memory it was "
            "recorded with, and offloading moves the weights); use one of them"
        )
    compile = compile or cuda_graphs
    if compile and offload == "sequential":
        raise UserError(
            "--compile does not work with --offload sequential (weights are swapped layer by "
            "layer inside the U-Net); use --offload model"
        )
    if compile and low_memory:
        flag = "--cuda-graphs" if cuda_graphs else "--compile"
        raise UserError(f"--low-memory does not work with {flag}; use one of them")
    if compile:
        from ldm_cli.runtime.compile import check_compile

        check_compile(device, cuda_graphs)
    # offloaded weights are read into CPU memory and never all sit on the GPU at once
    home = device if offload == "none" else torch.device("cpu")
    if low_memory is None:  # compiled graphs and offload hooks expect the compute dtype
        low_memory = not compile and offload == "none"
    model, header = load_with_options(path, home, dtype, prediction, clip_skip, low_memory)
    if compile:
        from ldm_cli.runtime.compile import compile_unet

        compile_unet(model.unet, device, cuda_graphs)
    apply_offload(model, offload, device)
    return model, header
