"""The SD 2.x prediction probe, as AUTOMATIC1111 does it: run the U-Net once at t=999 on a
constant 0.5 latent and context, and call it v when the mean of ``output - input`` is below -1.
At t=999 the latent is almost pure noise, so an eps model returns about its input; a v model
returns v = alpha*eps - sigma*x0 with alpha ~ 0.07, i.e. about minus its x0 estimate.
"""

from __future__ import annotations

import torch

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
