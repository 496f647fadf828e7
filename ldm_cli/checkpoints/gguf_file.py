"""GGUF files (city96's FLUX and SD3.5 quantisations): their header as detection reads it, and
their tensors as stored, read with the `gguf` package.

GGUF lists dimensions innermost first (ggml's order); here shapes are torch's (reversed), so a
GGUF file's header looks like a safetensors file's of the same model. A tensor's dtype is its
ggml type name (`F32`, `F16`, `BF16`, `Q8_0`, `Q4_K`, ...). Quantised tensors are kept as
their raw blocks (uint8) and widened a layer at a time when used (`ops.gguf_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_cli.checkpoints.header import CheckpointHeader, TensorInfo
from ldm_cli.core.errors import UserError

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFHeader(CheckpointHeader):
    """A CheckpointHeader of a GGUF file (offsets are absolute, as safetensors')."""


def read_gguf_header(path: Path) -> GGUFHeader:
    reader = _reader(path)
    tensors = {
        t.name: TensorInfo(
            t.tensor_type.name,
            tuple(int(d) for d in reversed(t.shape.tolist())),
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in reader.tensors
    }
    if not tensors:
        raise UserError(f"{path} holds no tensors")
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("general.") and field.types and field.types[0].name == "STRING":
            metadata[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return GGUFHeader(Path(path), tensors, metadata)


def read_gguf_tensors(path: Path, names) -> dict:
    """name -> (numpy view of the stored data, ggml type name, torch-order shape)."""
    wanted = set(names)
    found = {}
    for t in _reader(path).tensors:
        if t.name in wanted:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            found[t.name] = (t.data, t.tensor_type.name, shape)
    return found


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, mode="c")  # copy-on-write: writable views, nothing copied
    except (ValueError, KeyError, IndexError) as error:
        raise UserError(f"{Path(path).name} is not a readable GGUF file ({error})") from None
