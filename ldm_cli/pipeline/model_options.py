"""Loading with ``--prediction``/``--clip-skip`` applied, and the SD 2.x prediction probe.

The probe is the one AUTOMATIC1111 uses for SD 2.x: run the U-Net once at t=999 on a constant
0.5 latent and context, and call it v when the mean of ``output - input`` is below -1. At t=999
the latent is almost pure noise, so an eps model returns about its input; a v model returns
v = alpha*eps - sigma*x0 with alpha ~ 0.07, i.e. about minus its x0 estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.checkpoints.prediction import (
    check_prediction,
    settled_prediction,
    with_clip_skip,
    with_prediction,
)
from ldm_cli.core.config import ModelConfig
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.loading import load_model
from ldm_cli.models.unet import UNetModel

PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
PROBE_THRESHOLD = -1.0


@torch.inference_mode()
def probe_prediction(unet: UNetModel) -> str:
    """The prediction type ("v" or "eps") from one U-Net call on a constant 8x8 latent."""
    weight = next(unet.parameters())
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), PROBE_VALUE, device=weight.device)
    context = torch.full((1, 2, cfg.context_dim), PROBE_VALUE, device=weight.device)
    t = torch.tensor([PROBE_TIMESTEP], device=weight.device)
    out = unet(x.to(weight.dtype), t, context.to(weight.dtype)).float()
    shift = (out - x[:, : out.shape[1]]).mean().item()
    return "v" if shift < PROBE_THRESHOLD else "eps"


def resolve_prediction(
    cfg: ModelConfig, header: CheckpointHeader, unet: UNetModel, override: str | None
) -> ModelConfig:
    """`cfg` with its prediction type settled: `override`, else the file's, else probed."""
    if override is not None:
        return with_prediction(cfg, header, override)
    if settled_prediction(cfg, header) is not None:
        return cfg
    return with_prediction(cfg, header, probe_prediction(unet))


def load_with_options(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
    clip_skip: int | None = None,
    narrow: bool = False,
) -> tuple[LatentDiffusion, CheckpointHeader]:
    """`loading.load_model` with `--prediction`/`--clip-skip` applied and the prediction type
    of an SD 2.x file probed when nothing else settles it."""
    check_prediction(prediction)
    header = read_header(path)
    cfg = with_clip_skip(detect_config(header), clip_skip)
    model, header = load_model(header, device=device, dtype=dtype, cfg=cfg, narrow=narrow)
    model.config = resolve_prediction(cfg, header, model.unet, prediction)
    return model, header
