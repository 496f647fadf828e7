"""`--offload model|sequential`: weights live in CPU memory and visit the GPU as they run.

`model` (diffusers' enable_model_cpu_offload): each component (text encoder, U-Net, VAE) is
moved to the GPU whole when it starts and back to the CPU when the next one starts, through
accelerate's `cpu_offload_with_hook` chain; the peak is the largest component, and the U-Net
stays on the GPU for all its steps. `sequential` (enable_sequential_cpu_offload): the U-Net's
and the VAE's weights are copied to the GPU layer by layer, each just for its own forward
(`accelerate.cpu_offload`), the least GPU memory (SDXL in 4-6 GB) at a large cost in speed.
The text encoders run once per batch and read some of their weights directly (SDXL's pooled
projection), so they move whole, as in `model`, and leave when the U-Net starts.

accelerate is imported only when offloading is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldm_cli.core.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

OFFLOAD_MODES = ("none", "model", "sequential")
# Sequential offload brings a layer's weights to the GPU when that layer's forward runs. These
# modules read a child's weights without calling it (Upsample folds its conv's kernel), so
# their whole subtree is brought in at their own forward instead.
PRELOAD_CLASSES = ["Upsample"]


def check_offload_mode(mode: str) -> None:
    """The option's value alone (no torch needed, so the CLI checks it before loading)."""
    if mode not in OFFLOAD_MODES:
        raise UserError(f"unknown --offload {mode!r}; use {', '.join(OFFLOAD_MODES)}")


def check_offload_device(mode: str, device: torch.device) -> None:
    check_offload_mode(mode)
    if mode != "none" and device.type != "cuda":
        raise UserError(
            f"--offload {mode} needs a CUDA device: on {device.type} the weights already live "
            "in CPU memory, so there is nothing to offload to"
        )


def components(model: nn.Module) -> list[nn.Module]:
    """The parts that run one after another: text encoder(s), U-Net, VAE."""
    return [model.text_encoder, model.unet, model.vae]


def apply_offload(model: nn.Module, mode: str, device: torch.device) -> None:
    """Install the offload hooks on a LatentDiffusion whose weights are on the CPU; its
    forward passes then run on `device` (their inputs are moved there)."""
    check_offload_mode(mode)
    if mode == "none":
        return
    import torch

    if device.type == "cuda" and device.index is None:  # hooks compare devices with ==
        device = torch.device("cuda", torch.cuda.current_device())
    from accelerate import cpu_offload, cpu_offload_with_hook

    text, unet, vae = components(model)
    if mode == "sequential":
        _, text_hook = cpu_offload_with_hook(text, execution_device=device)
        _run_hook_from_children(text, text_hook)
        for part in (unet, vae):
            cpu_offload(part, execution_device=device, preload_module_classes=PRELOAD_CLASSES)
        unet.register_forward_pre_hook(lambda *_: _offload_if_on_gpu(text_hook))
        return
    hooks = []
    for part in (text, unet, vae):
        previous = hooks[-1] if hooks else None
        _, hook = cpu_offload_with_hook(part, execution_device=device, prev_module_hook=previous)
        _run_hook_from_children(part, hook)
        hooks.append(hook)
    # Close the chain: the next run's text encoding sends the VAE of the last run back.
    hooks[0].hook.prev_module_hook = hooks[-1]


def _offload_if_on_gpu(hook) -> None:
    if next(hook.model.parameters()).device.type != "cpu":
        hook.offload()


def _run_hook_from_children(part: nn.Module, hook) -> None:
    """accelerate's hook runs at `part.forward`; the VAE is used through encode/decode and
    SDXL's text towers through their submodules, so the hook also runs before any direct
    child's forward (a device check once the part is on the GPU)."""

    def bring(_module, _args):
        hook.hook.pre_forward(part)

    for child in part.children():
        child.register_forward_pre_hook(bring)
