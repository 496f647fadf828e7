"""What a checkpoint holds, as detection reads it: tensor names, dtypes, shapes and metadata
(`CheckpointHeader`), whichever file format it came from (`file`, `pickled`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Tensors that real checkpoints carry besides the parameters: the training schedule,
# EMA bookkeeping and the CLIP position-id buffer. They are skipped, nothing else is.
KNOWN_EXTRAS = re.compile(
    r"^(model_ema\..*"
    # the x4 upscaler's noise augmentation keeps its own schedule buffers
    r"|low_scale_model\..*"
    r"|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod"
    r"|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod"
    r"|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped"
    r"|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights"
    r"|.*\.position_ids"
    r"|v_pred|ztsnr)$"  # markers of v-prediction and zero-terminal-SNR models
)

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


@dataclass(frozen=True)
class CheckpointHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.tensors.get(key)
        return info.shape if info else None

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)
