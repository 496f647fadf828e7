"""Writing single-file checkpoints in the original key layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm_cli.checkpoints.detect import config_to_json
from ldm_cli.core.config import ModelConfig


def save_checkpoint(
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    cfg: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write atomically (temporary name, then rename); floats cast to `dtype` if given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    meta = dict(metadata or {})
    if cfg is not None:
        meta["ldm_config"] = config_to_json(cfg)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(out, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
