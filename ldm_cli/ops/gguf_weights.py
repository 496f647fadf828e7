"""GGUF-quantised weights kept as their blocks and widened a layer at a time, as diffusers'
GGUF support and ComfyUI-GGUF do: a linear layer's weight is a parametrization over the raw
uint8 blocks that dequantises on every access, so only one layer's weights are ever wide.

Q8_0, Q4_0 and Q4_1 (the blocks city96's FLUX files use most) are dequantised in torch, on
the weight's device; the other ggml types (K-quants, Q5_*, IQ*) through the `gguf` package's
numpy reference, on the CPU. Both give exactly `gguf.quants.dequantize`'s values.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def plain_tensor(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An F32/F16/BF16 GGUF tensor as a torch tensor viewing the file's bytes."""
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    return raw.view(PLAIN[type_name]).reshape(shape)


def dequantize(raw: torch.Tensor, type_name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The weight of torch-order `shape` that the ggml blocks `raw` (uint8) hold, in `dtype`."""
    torch_fn = _TORCH_DEQUANT.get(type_name)
    if torch_fn is not None:
        return torch_fn(raw.reshape(-1, _BLOCK_BYTES[type_name])).reshape(shape).to(dtype)
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    values = gguf.quants.dequantize(raw.cpu().numpy(), qtype)
    return torch.from_numpy(values).reshape(shape).to(device=raw.device, dtype=dtype)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    scale = _half(blocks, 0)
    return scale * blocks[:, 2:].contiguous().view(torch.int8).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low nibbles (the block's first half) then high nibbles (its second half)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)


_TORCH_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


class Dequantize(nn.Module):
    """The parametrization: raw ggml blocks -> the weight, in `dtype`, at each access."""

    def __init__(self, type_name: str, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.type_name, self.shape, self.dtype = type_name, tuple(shape), dtype

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return dequantize(raw, self.type_name, self.shape, self.dtype)


def quantize_weight_(
    module: nn.Module, type_name: str, shape: tuple[int, ...], dtype, raw_shape
) -> str:
    """Make `module.weight` a parametrization over raw blocks of `raw_shape` (on the meta
    device until loaded); returns the state-dict suffix the blocks load under."""
    module.weight = nn.Parameter(
        torch.empty(raw_shape, dtype=torch.uint8, device="meta"), requires_grad=False
    )
    parametrize.register_parametrization(
        module, "weight", Dequantize(type_name, shape, dtype), unsafe=True
    )
    return "parametrizations.weight.original"
