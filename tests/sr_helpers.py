"""Seeded random upscaler files in the layouts people have: Real-ESRGAN's compact SRVGG and
the RRDBNet of RealESRGAN_x4plus (BasicSR's key names, as its .pth holds them)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_cli.models.sr_compact import CompactShape, SRVGGCompact


def compact_state(shape: CompactShape, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    module = SRVGGCompact(shape)
    with torch.no_grad():  # a visible residual, so that a wrong layer would show
        for p in module.parameters():
            if p.ndim == 4:
                p.normal_(0, 0.5 / (p.shape[1] * 9) ** 0.5)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def write_compact(path: Path, shape: CompactShape, seed: int = 0) -> Path:
    save_file(compact_state(shape, seed), str(path))
    return path


def rrdb_state(blocks: int = 23, features: int = 64, grow: int = 32, seed: int = 0) -> dict:
    """RealESRGAN_x4plus's tensors (BasicSR RRDBNet, scale 4): conv_first, `blocks` RRDBs of
    three dense blocks of five convolutions, conv_body, two upsampling convs, conv_hr,
    conv_last; small seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int) -> None:
        state[f"{name}.weight"] = torch.randn(out, inp, 3, 3, generator=gen) * (
            0.3 / (inp * 9) ** 0.5
        )
        state[f"{name}.bias"] = torch.randn(out, generator=gen) * 0.01

    conv("conv_first", features, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out = features if c == 5 else grow
                conv(f"body.{b}.rdb{r}.conv{c}", out, features + (c - 1) * grow)
    conv("conv_body", features, features)
    conv("conv_up1", features, features)
    conv("conv_up2", features, features)
    conv("conv_hr", features, features)
    conv("conv_last", 3, features)
    return state
