"""The checkpoint a tool reads, one tensor at a time, whatever its format.

- `.safetensors`: its header is validated (checkpoints.file) and each tensor read on demand
  into a buffer of its own (checkpoints.file.read_tensor), so only the tensors in hand are in
  the process's memory (a memory map would add every page read to it).
- a pickle (`.ckpt`, `.pt`, `.pth`, `.bin`): read with torch's weights-only unpickler
  (checkpoints.pickled: tensors, containers and plain values only, no code in the file runs);
  zip-format pickles are memory-mapped, older ones are read whole.
- a diffusers folder (SD 1.x/2.x/XL): renamed to the original single-file layout by
  checkpoint_tools.diffusers_folder, in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.checkpoint_tools.stream_writer import DTYPE_NAMES, TORCH_DTYPES
from ldm_cli.checkpoints.header import CheckpointHeader, TensorInfo
from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError

DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}  # --dtype: the safetensors names


def check_output(out: Path, dtype: str | None) -> None:
    """What convert and merge refuse before reading anything: an OUT that exists, a bad --dtype."""
    if out.exists():
        raise UserError(f"{out} exists already; give a new name (nothing is overwritten)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use fp32, fp16 or bf16")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


@dataclass
class Source:
    """A checkpoint's tensors (name -> (dtype name, shape)), metadata, and a reader."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    read: Callable[[str], torch.Tensor]
    config: ModelConfig | None = None  # known for a diffusers folder

    @property
    def name(self) -> str:
        return self.path.name

    def header(self) -> CheckpointHeader:
        """The header view that detection reads (checkpoints.detect)."""
        infos = {k: TensorInfo(dtype, shape) for k, (dtype, shape) in self.tensors.items()}
        return CheckpointHeader(self.path, infos, self.metadata)

    def model_config(self) -> ModelConfig:
        """The SD architecture of the checkpoint; a one-line error for anything else."""
        if self.config is None:
            from ldm_cli.checkpoints.detect import detect_config

            self.config = detect_config(self.header())
        return self.config

    def is_float(self, key: str) -> bool:
        return self.tensors[key][0] in FLOAT_DTYPES


@contextlib.contextmanager
def open_source(path: Path, what: str) -> Iterator[Source]:
    """`path` (a checkpoint file or a diffusers folder) as a Source while the block runs;
    `what` names it in errors ("IN", "--vae", "A", ...)."""
    path = Path(path)
    if path.is_dir():
        yield _folder(path, what)
        return
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    from ldm_cli.checkpoints.file import read_header
    from ldm_cli.checkpoints.gguf_file import is_gguf
    from ldm_cli.checkpoints.pickled import PickledHeader, allow_pickle

    if is_gguf(path):
        raise UserError(f"{what} {path.name} is a GGUF file (quantised); it is not converted")
    with allow_pickle():  # weights-only: see the module's docstring
        header = read_header(path)
    tensors = {k: (t.dtype, tuple(t.shape)) for k, t in header.tensors.items()}
    if isinstance(header, PickledHeader):
        yield Source(path, tensors, {}, header.state.__getitem__)
        return
    unknown = next((k for k, (dtype, _) in tensors.items() if dtype not in TORCH_DTYPES), None)
    if unknown is not None:
        raise UserError(f"{what} {path.name}: tensor {unknown!r} has unsupported dtype")
    from ldm_cli.checkpoints.file import read_tensor

    # plain reads into each tensor's own buffer, not through a memory map: the file's pages
    # then never count in this process's memory, only the tensors in hand do
    with open(path, "rb") as file:

        def read(key: str) -> torch.Tensor:
            info = header.tensors[key]
            return read_tensor(file, info, TORCH_DTYPES[info.dtype])

        yield Source(path, tensors, dict(header.metadata), read)


def _folder(path: Path, what: str) -> Source:
    from ldm_cli.checkpoint_tools.diffusers_folder import read_diffusers_folder
    from ldm_cli.checkpoints.pickled import allow_pickle

    with allow_pickle():  # a folder's .bin weights: weights-only, as a .ckpt
        state, cfg = read_diffusers_folder(path)
    tensors = {}
    for key, tensor in state.items():
        name = DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            raise UserError(f"{what} {path.name}: tensor {key!r} has unsupported dtype")
        tensors[key] = (name, tuple(tensor.shape))
    return Source(path, tensors, {}, state.__getitem__, cfg)


def cast(tensor: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """`tensor` in the dtype named `dtype_name` (unchanged when it is already)."""
    want = TORCH_DTYPES[dtype_name]
    return tensor if tensor.dtype == want else tensor.to(want)
