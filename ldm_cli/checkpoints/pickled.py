"""Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`): refused unless `--allow-pickle`.

Unpickling can call any function the file names, so a pickle from the internet can run code.
With `--allow-pickle` the file is read with `torch.load(weights_only=True)`: torch's restricted
unpickler builds tensors, containers and plain values only and refuses every other global, so
no code in the file runs. Zip-format files (every `torch.save` since torch 1.6) are also
memory-mapped. The tensors (under `state_dict` when the file wraps them, as Lightning
checkpoints do) then go through the same detection and strict load as a `.safetensors` file:
`read_pickled_header` gives the header-like view of names, shapes and dtypes that detection
reads, and `pickled_state` the tensors that `loading.load_model` assigns.

Library use: `with allow_pickle(): pipe = ldm_cli.load("model.ckpt")`.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ldm_cli.checkpoints.header import DTYPE_SIZES, CheckpointHeader, TensorInfo
from ldm_cli.core.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"
_ALLOWED = {"on": False}


def set_allow_pickle(on: bool) -> None:
    """Allow (or refuse again) pickled checkpoints in this process (`--allow-pickle`)."""
    _ALLOWED["on"] = bool(on)


def pickle_allowed() -> bool:
    return _ALLOWED["on"]


@contextlib.contextmanager
def allow_pickle(on: bool = True) -> Iterator[None]:
    """Pickled checkpoints are read (weights only) inside this block."""
    before = _ALLOWED["on"]
    _ALLOWED["on"] = on
    try:
        yield
    finally:
        _ALLOWED["on"] = before


def looks_pickled(path: Path) -> bool:
    """A pickle by its name, or by its first bytes whatever the name: a zip archive (torch.save)
    or a pickle protocol mark where a safetensors header length could not be."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError:
        return False  # the safetensors reader reports it
    if head.startswith(_ZIP_MAGIC):
        return True
    if len(head) == 8 and head[0] == 0x80 and 2 <= head[1] <= 5:
        header_size = int.from_bytes(head, "little")
        return header_size + 8 > size
    return False


def refusal(path: Path) -> str:
    return (
        f"{path.name} is a pickled checkpoint, which can run code when loaded; pass "
        "--allow-pickle to read only its tensors (torch.load weights_only), or convert it to "
        ".safetensors"
    )


@dataclass(frozen=True)
class PickledHeader(CheckpointHeader):
    """A CheckpointHeader whose tensors were unpickled already (weights only)."""

    state: dict = field(default_factory=dict, compare=False, repr=False)


_CACHE: dict[tuple, PickledHeader] = {}


def read_pickled_header(path: str | os.PathLike) -> PickledHeader:
    """The names, shapes and dtypes of a pickled checkpoint's tensors (weights-only load);
    one-line UserError without `--allow-pickle` or for anything but a state dict."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"checkpoint path is a directory, expected a checkpoint file: {path}")
    if not pickle_allowed():
        raise UserError(refusal(path))
    try:
        stat = path.stat()
    except OSError as error:
        raise UserError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    state = _unwrap(path, _load_weights_only(path))
    tensors = {name: _info(path, name, tensor) for name, tensor in state.items()}
    header = PickledHeader(path, tensors, {}, state=state)
    _CACHE.clear()  # one file at a time: its tensors may be mapped or resident
    _CACHE[key] = header
    return header


def load_weights_only(path: str | os.PathLike):
    """Whatever a pickled file holds, read with torch's weights-only unpickler; refused
    without `--allow-pickle`, failures as one-line UserErrors. For LoRA and embedding files
    too."""
    path = Path(path)
    if not pickle_allowed():
        raise UserError(refusal(path))
    return _load_weights_only(path)


def _load_weights_only(path: Path):
    import torch

    try:
        mmap = zipfile.is_zipfile(path)
    except OSError as error:
        raise UserError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.serialization.safe_globals(_harmless_globals()))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and the like
            source = path
            if path.suffix.lower() == ".safetensors":  # torch.load would read it as safetensors
                source, mmap = stack.enter_context(open(path, "rb")), False
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise UserError(f"cannot read checkpoint {path}: permission denied") from None
    except Exception as error:  # anything an untrusted file provokes is the file's problem
        raise UserError(_load_failure(path, error)) from error


def _load_failure(path: Path, error: Exception) -> str:
    """One line on why torch's weights-only unpickler stopped."""
    message = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", message)
    if refused:
        return (
            f"{path.name}: refused: its pickle calls {refused.group(1)}, which is not a tensor "
            "or plain value; nothing in it was run (weights-only loading)"
        )
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "WeightsUnpickler error" in message:
        after = lines.index(next(x for x in lines if "WeightsUnpickler error" in x)) + 1
        what = lines[after] if after < len(lines) else "an instruction"
        return (
            f"{path.name}: refused: its pickle holds what weights-only loading does not allow "
            f"({what[:120]}); nothing in it was run"
        )
    first = lines[0] if lines else type(error).__name__
    return f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {first[:160]})"


class _Ignored:
    """Stand-in for objects that training frameworks pickle beside the weights (Lightning's
    ModelCheckpoint callback in the original SD checkpoints): built empty, never run."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _harmless_globals() -> list:
    return [
        (_Ignored, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_Ignored, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    ]


def _unwrap(path: Path, obj) -> dict:
    """The flat name -> tensor dict: `state_dict` unwrapped, non-tensor entries dropped."""
    import torch

    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{path} holds no tensors")
    return state


def _dtype_names() -> dict:
    import torch

    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def _info(path: Path, name: str, tensor) -> TensorInfo:
    dtype = _dtype_names().get(tensor.dtype)
    if dtype is None:
        raise UserError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
    shape = tuple(int(d) for d in tensor.shape)
    return TensorInfo(dtype, shape, 0, tensor.numel() * DTYPE_SIZES[dtype])


def pickled_state(header: PickledHeader, keys, device, dtype) -> dict:
    """The tensors `keys` in the model's dtype on `device`; those already right are used in
    place (memory-mapped for zip files), as safetensors tensors are."""
    import torch

    device = torch.device(device)
    state = {}
    for k in keys:
        tensor = header.state[k]
        target = (dtype or tensor.dtype) if tensor.is_floating_point() else tensor.dtype
        if target == tensor.dtype and device.type == "cpu":
            state[k] = tensor
        else:
            state[k] = tensor.to(device=device, dtype=target)
    return state
