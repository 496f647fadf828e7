"""Helpers for the x4 upscaler tests: header-only full-size checkpoints and diffusers twins."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ldm_cli.core.config import ModelConfig
from ldm_cli.models.loading import build_empty
from ldm_cli.testing import training_extras

LDM_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32"}


def write_sparse_checkpoint(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """A safetensors file with this header and all-zero data, written sparse: a full-size
    layout that costs no disk space or memory, for header-only code (detection, `ldm info`)."""
    sizes = {"F32": 4, "F16": 2, "I64": 8, "I32": 4}
    header, offset = {}, 0
    for key, (shape, dtype) in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        end = offset + numel * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def real_layout_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of an original fp16 checkpoint of `cfg` (weights plus the extras)."""
    shapes = {
        k: (tuple(v.shape), "F16" if v.is_floating_point() else LDM_DTYPES[v.dtype])
        for k, v in build_empty(cfg).state_dict().items()
    }
    for k, v in training_extras(cfg).items():
        if cfg.text.kind == "openclip" and k.startswith("cond_stage_model.transformer."):
            continue  # the CLIP-L position ids; OpenCLIP files have none
        shapes[k] = (tuple(v.shape), LDM_DTYPES[v.dtype])
    return shapes
