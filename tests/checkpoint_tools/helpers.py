"""Shared by the checkpoint_tools tests: running `ldm convert`/`ldm merge` in a subprocess, and
small LoRA and VAE files for tiny models."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_cli.core.config import ModelConfig
from tests.cli_helpers import ldm

REPO = Path(__file__).resolve().parents[2]


def ldm_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`ldm ARGS` in a subprocess from the repository root (paths given as Path or str)."""
    return ldm(*map(str, args), cwd=REPO, check=check)


def write_lora(path: Path, cfg: ModelConfig, seed: int, rank: int = 2, dora: bool = False) -> Path:
    """A kohya-named LoRA (lora_unet_*/lora_te_*) on the attention, projection and feed-forward
    linear layers of `cfg`'s U-Net and text encoder, seeded, with alphas; `dora`: with
    LyCORIS' DoRA magnitudes (dora_scale [1, in])."""
    from ldm_cli.models.loading import build_empty
    from ldm_cli.networks.keys import layer_table

    gen = torch.Generator().manual_seed(seed)
    model = build_empty(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors, taken = {}, set()
    for name, target in sorted(layer_table(model).items()):
        kohya = name.startswith(("lora_unet_", "lora_te_"))
        wanted = any(p in name for p in ("attn", "proj", "ff_net", "mlp"))
        shape = shapes[target.param]
        if not kohya or not wanted or target.rows is not None or len(shape) != 2:
            continue
        if target.param in taken:  # one name per weight (a U-Net layer has two)
            continue
        taken.add(target.param)
        out, inp = shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
        if dora:
            tensors[f"{name}.dora_scale"] = 0.5 + torch.rand(1, inp, generator=gen)
    save_file(tensors, str(path))
    return path


def write_vae(path: Path, checkpoint: Path, seed: int, prefix: str = "") -> Path:
    """A separate VAE in the original layout: the checkpoint's VAE tensors, changed (seeded)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(checkpoint))
    vae = {}
    for key, tensor in state.items():
        if key.startswith("first_stage_model."):
            noise = torch.randn(tensor.shape, generator=gen) * 0.05
            vae[prefix + key.removeprefix("first_stage_model.")] = tensor + noise * tensor.std()
    save_file(vae, str(path))
    return path
