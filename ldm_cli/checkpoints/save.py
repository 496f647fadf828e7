"""Writing single-file checkpoints in the original key layout.

safetensors writes the metadata of a file in hash-map order, which changes from call to call;
the header is rewritten with its keys sorted (the same bytes, reordered), so the same tensors
and metadata always give the same file (a resumed training run ends with the very file an
uninterrupted one writes).
"""

from __future__ import annotations

import json
import os
import struct
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
        sort_header(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def sort_header(path: Path) -> None:
    """Rewrite a safetensors header in place with its keys sorted (same length: the same JSON
    text reordered, padded with spaces as the format allows)."""
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > length:
            return  # never grow the header (the data would move); keep safetensors' order
        file.seek(8)
        file.write(text + b" " * (length - len(text)))
