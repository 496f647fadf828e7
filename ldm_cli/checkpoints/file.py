"""Reading single-file checkpoints: header inspection and memory-mapped tensors.

Only `.safetensors` files are opened here: they hold no code and their tensors are
memory-mapped, so a 2 GB checkpoint is never copied into RAM when its dtype matches.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from pathlib import Path

from ldm_cli.checkpoints.header import DTYPE_SIZES, CheckpointHeader, TensorInfo
from ldm_cli.core.errors import UserError

# A header larger than this is not a checkpoint header (real ones are well under 1 MiB;
# SDXL with ~2500 tensors is ~250 KiB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """Parse and validate a safetensors header before anything is allocated."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"checkpoint path is a directory, expected a .safetensors file: {path}")
    from ldm_cli.checkpoints.gguf_file import is_gguf, read_gguf_header
    from ldm_cli.checkpoints.pickled import looks_pickled, read_pickled_header

    if is_gguf(path):  # quantised FLUX/SD3 transformers (checkpoints.gguf_file)
        return read_gguf_header(path)

    if looks_pickled(path):  # refused unless --allow-pickle, then read weights-only
        return read_pickled_header(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is not a safetensors file (too short: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise UserError(f"{path} is not a safetensors file (header size {n} is invalid)")
            raw = f.read(n)
    except PermissionError as e:
        raise UserError(f"cannot read checkpoint {path}: permission denied") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not a safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: safetensors metadata is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _validate_entry(path, key, entry, data_size)
    if not tensors:
        raise UserError(f"{path} holds no tensors")
    tensors = {k: replace(t, offset=t.offset + 8 + n) for k, t in tensors.items()}
    return CheckpointHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_entry(path: Path, key: str, entry, data_size: int) -> TensorInfo:
    # JSON types checked exactly: no floats, strings or infinities where integers belong
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(_is_int(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
    ):
        raise UserError(f"{path}: malformed header entry for tensor {key!r}")
    shape, (begin, end) = tuple(shape), offsets
    if dtype not in DTYPE_SIZES:
        raise UserError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise UserError(f"{path}: tensor {key!r} has a negative dimension {shape}")
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end <= data_size:
        raise UserError(
            f"{path} is truncated or corrupt: tensor {key!r} lies outside the file "
            f"(bytes {begin}..{end} of {data_size})"
        )
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise UserError(f"{path}: tensor {key!r} byte size does not match its shape {shape}")
    return TensorInfo(dtype, shape, begin, end - begin)


def open_tensors(path: Path):
    """Memory-mapped tensors of a (validated) safetensors file, as a context manager."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def read_tensor(file, info: TensorInfo, dtype):
    """One tensor read with plain file I/O into its own buffer (not through the mmap).

    Used when the tensor is converted anyway (another dtype or device): the file's pages
    then never stay mapped beside the converted copy, so peak memory is the model plus one
    tensor, not the model plus the whole file.
    """
    import torch

    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    file.seek(info.offset)
    if file.readinto(buffer.numpy()) != info.nbytes:
        raise UserError(f"{file.name} is truncated: could not read all of a tensor")
    return buffer.view(dtype).reshape(info.shape)
