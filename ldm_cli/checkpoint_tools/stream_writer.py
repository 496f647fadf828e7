"""A `.safetensors` file written tensor by tensor, never holding the whole model in memory.

The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and byte range, plus ``__metadata__``) and the raw bytes. Every tensor's dtype and shape is
known before any is made, so the header is written first and each tensor's bytes follow as
it is produced, then dropped. As in `checkpoints.save`: the header's keys are sorted (the same
tensors and metadata always give the same file), the data is laid out as safetensors lays it
(widest dtype first, so memory-mapped tensors stay aligned), and the file is written under a
temporary name and published atomically, never over an existing file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.core.errors import UserError

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the file to write: its dtype (a safetensors name), shape, and how to make
    it when its turn comes."""

    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * TORCH_DTYPES[self.dtype].itemsize


def write_streaming(
    path: str | os.PathLike, tensors: dict[str, OutTensor], metadata: dict[str, str]
) -> Path:
    """Write `tensors` to the new file `path` one at a time; a UserError if `path` exists."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists already; give a new file name (nothing is overwritten)")
    order = sorted(tensors, key=lambda k: (-TORCH_DTYPES[tensors[k].dtype].itemsize, k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        entry = tensors[key]
        header[key] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            file.write(struct.pack("<Q", len(text)) + text)
            for key in order:
                _write_tensor(file, key, tensors[key])
            file.flush()
            os.fsync(file.fileno())
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_tensor(file, key: str, entry: OutTensor) -> None:
    tensor = entry.make()
    want = TORCH_DTYPES[entry.dtype]
    if tensor.dtype != want or tuple(tensor.shape) != entry.shape:
        raise RuntimeError(
            f"internal error: {key} is {tensor.dtype} {tuple(tensor.shape)}, announced as "
            f"{want} {entry.shape}"
        )
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if data.numel():
        file.write(data.view(torch.uint8).numpy().data)


def publish(tmp: Path, path: Path) -> None:
    """Give the finished `tmp` its final name without ever replacing a file there: a hard
    link fails if the name is taken (where links are not supported: the name is created with
    O_EXCL first, then renamed over)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(
            f"{path} exists already; give a new file name (nothing is overwritten)"
        ) from None
    except OSError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise UserError(
                f"{path} exists already; give a new file name (nothing is overwritten)"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()
