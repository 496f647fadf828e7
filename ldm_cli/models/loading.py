"""Build a model on the meta device and fill it from a memory-mapped checkpoint, strictly."""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import open_tensors, read_header, read_tensor
from ldm_cli.checkpoints.header import KNOWN_EXTRAS, CheckpointHeader
from ldm_cli.checkpoints.pickled import PickledHeader, pickled_state
from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.ops import narrow_weights
from ldm_cli.ops.channels_last import stored_channels_last
from ldm_cli.ops.conv_linear import Linear
from ldm_cli.ops.converted_load import read_converted
from ldm_cli.ops.winograd_conv import WinogradConv2d

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
UNET_PREFIX = "model.diffusion_model."


class SkipMetaInit(TorchFunctionMode):
    """Makes parameter initialisation a no-op on meta tensors.

    Initialising meta tensors does nothing useful, and ``normal_`` on meta is a Python
    reference decorated to disable dynamo, whose first use imports torch._dynamo: 2-5 s of
    start-up for a model that loads in milliseconds.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        is_init = getattr(func, "__module__", None) == "torch.nn.init"
        if (is_init or getattr(func, "__name__", "") in _INPLACE_FILLS) and _on_meta(target):
            return target
        return func(*args, **kwargs)


_INPLACE_FILLS = frozenset({"normal_", "uniform_", "trunc_normal_", "zero_", "fill_"})


def _on_meta(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


def build_empty(cfg: ModelConfig) -> LatentDiffusion:
    with torch.device("meta"), SkipMetaInit():
        return LatentDiffusion(cfg)


def checked_architecture(
    header: CheckpointHeader, cfg: ModelConfig
) -> tuple[LatentDiffusion, list[str]]:
    """The empty (meta) model of `cfg` and the file's keys to load into it; a UserError where
    the file's tensors do not make that model."""
    try:
        model = build_empty(cfg)
    except ValueError as error:  # shapes no real model of the family has (GroupNorm widths...)
        raise UserError(
            f"{header.path.name} does not match the detected architecture ({cfg.family}): "
            f"{error} (a file of ldm's own needs the ldm_config metadata it was saved with)"
        ) from None
    return model, check_keys(model, header)


def check_keys(model: torch.nn.Module, header: CheckpointHeader) -> list[str]:
    """The checkpoint keys to load; raises naming missing, unexpected or mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = [k for k in header.tensors if not KNOWN_EXTRAS.match(k) or k in expected]
    missing = sorted(set(expected) - set(present))
    problems = key_problems(expected, header, present, missing)
    if problems:
        raise UserError(
            f"{header.path.name} does not match the detected architecture: " + "; ".join(problems)
        )
    return present


def key_problems(
    expected: dict[str, tuple[int, ...]], header: CheckpointHeader, present, missing: list[str]
) -> list[str]:
    """What keeps `header`'s tensors `present` from loading into a model of `expected`
    shapes: missing, unexpected and mis-shaped tensors, a few named each."""
    unexpected = sorted(set(present) - set(expected))
    wrong = sorted(k for k in present if k in expected and header.shape(k) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} tensors of the wrong shape ({k}: file {list(header.shape(k))}, "
            f"model {list(expected[k])})"
        )
    return problems


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_model(
    path: str | Path | CheckpointHeader,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cfg: ModelConfig | None = None,
    narrow: bool = False,
) -> tuple[LatentDiffusion, CheckpointHeader]:
    """Load a checkpoint (its path, or its header already read); tensors already in `dtype`
    on CPU are used in place (mmap). `narrow` (inference only, `--low-memory`): the U-Net's large
    weights of an fp16/bf16 file stay views of it when run in fp32 on the CPU
    (models/narrow_weights)."""
    header = path if isinstance(path, CheckpointHeader) else read_header(path)
    cfg = cfg or detect_config(header)
    model, keys = checked_architecture(header, cfg)
    device = torch.device(device)
    if isinstance(header, PickledHeader):  # --allow-pickle: unpickled weights-only
        state = pickled_state(header, keys, device, dtype)
    else:
        kept = narrow_keys(model, header, device, dtype) if narrow else frozenset()
        state = read_safetensors(header, keys, device, dtype, kept)
    model.load_state_dict(state, strict=True, assign=True)
    model.text_encoder.materialize_buffers()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UserError(f"internal error: {name} was not loaded from {header.path.name}")
    model.requires_grad_(False)
    return model.eval(), header


def narrow_keys(
    model: LatentDiffusion, header: CheckpointHeader, device: torch.device, dtype
) -> frozenset[str]:
    """The U-Net weights that stay in the file's fp16/bf16 when run in fp32 on the CPU: those of
    its convolutions and linear layers that widen their weights per call (narrow_weights)."""
    if device.type != "cpu" or dtype != torch.float32:
        return frozenset()
    keys = set()
    for name, module in model.named_modules():
        if not name.startswith(UNET_PREFIX) or not isinstance(module, WinogradConv2d | Linear):
            continue
        info = header.tensors.get(f"{name}.weight")
        narrow = info is not None and info.dtype in ("F16", "BF16")
        if narrow and math.prod(info.shape) * dtype.itemsize >= narrow_weights.MIN_BYTES:
            keys.add(f"{name}.weight")
    return frozenset(keys)


def read_safetensors(
    header: CheckpointHeader, keys, device: torch.device, dtype, narrow=frozenset()
) -> dict:
    state, convert = {}, {}
    with open_tensors(header.path) as mapped, open(header.path, "rb") as raw:
        in_place = _FileViews(raw)
        for k in keys:
            info = header.tensors[k]
            stored = TORCH_DTYPES.get(info.dtype)
            target = (dtype or stored) if stored is not None else None
            if stored is not None and device.type == "cpu" and (target == stored or k in narrow):
                state[k] = in_place.view(info, stored)
            elif stored is None:
                state[k] = mapped.get_tensor(k)  # other dtypes (I64 ...), used as they are
            elif device.type == "cpu" and target == dtype:
                convert[k] = (stored, info.shape, info.offset)  # below, all at once
            else:
                state[k] = read_tensor(raw, info, stored).to(device=device, dtype=target)
    if convert:
        nhwc = frozenset(
            k for k, (_, shape, _) in convert.items() if stored_channels_last(k, shape, dtype)
        )
        state.update(read_converted(header.path, convert, dtype, nhwc))
    return state


class _FileViews:
    """Tensors that are views of one private memory map of the open file `raw` (zero-copy;
    writable, as LoRA patches need, without touching the file). Made with torch.frombuffer: a
    quarter of the time of safetensors' get_tensor per tensor (3 against 12 ms for SD 1.5's
    1,131). The map outlives the file object: the tensors keep it."""

    def __init__(self, raw):
        self.raw, self._map = raw, None

    def view(self, info, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        if info.offset % dtype.itemsize:  # not aligned for its type: a copy of its own
            return read_tensor(self.raw, info, dtype)
        if self._map is None:
            self._map = mmap.mmap(self.raw.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=info.offset).view(
            info.shape
        )
