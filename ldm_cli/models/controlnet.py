"""ControlNet, laid out as the original ``cldm.ControlNet`` (lllyasviel's ``control_model.*``).

A trainable copy of the U-Net's encoder (time embedding, input blocks, middle block) reads the
noisy latents plus a control image embedded by ``input_hint_block`` (eight convolutions down to
the latent size, the last one zero-initialised) and added after the first input block. Each
input block's output passes a zero-initialised 1x1 convolution (``zero_convs.i.0``), the middle
block's ``middle_block_out.0``: one residual per U-Net skip and one for the middle, which
`UNetModel.forward(control=...)` adds (diffusers' ``down_block_additional_residuals`` and
``mid_block_additional_residual``).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.config import UNetConfig
from ldm_cli.models.unet import UNetEncoder

# input_hint_block's widths (diffusers' conditioning_embedding_out_channels): a convolution to
# the first, then per width after it one at the same width and one at stride 2 to the next,
# then the zero convolution to the U-Net's width; SiLU between them. Three halvings: SD's f=8.
HINT_WIDTHS = (16, 32, 96, 256)
HINT_CHANNELS = 3


class ControlNet(UNetEncoder):
    def __init__(
        self,
        cfg: UNetConfig,
        hint_channels: int = HINT_CHANNELS,
        hint_widths: tuple[int, ...] = HINT_WIDTHS,
    ):
        super().__init__()
        skip_channels = self._build_encoder(cfg)
        convs = [nn.Conv2d(hint_channels, hint_widths[0], 3, padding=1)]
        for width, following in zip(hint_widths, hint_widths[1:], strict=False):
            convs.append(nn.Conv2d(width, width, 3, padding=1))
            convs.append(nn.Conv2d(width, following, 3, padding=1, stride=2))
        convs.append(nn.Conv2d(hint_widths[-1], cfg.model_channels, 3, padding=1))
        layers: list[nn.Module] = []
        for conv in convs:
            layers += [conv, nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers[:-1])
        self.hint_widths = tuple(hint_widths)
        self.hint_factor = 2 ** (len(hint_widths) - 1)  # control pixels per latent pixel
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in skip_channels)
        ch = skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(ch, ch, 1))

    def zero_init(self) -> ControlNet:
        """Zero the last hint convolution and every output convolution, as a ControlNet starts
        training: the U-Net it is added to is unchanged until it learns."""
        with torch.no_grad():
            for conv in [self.input_hint_block[-1], *(z[0] for z in self.zero_convs)]:
                conv.weight.zero_()
                conv.bias.zero_()
            self.middle_block_out[0].weight.zero_()
            self.middle_block_out[0].bias.zero_()
        return self

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for `UNetModel.forward(control=...)`: `x` [B, C, h, w] the U-Net's input,
        `hint` [B, 3, f h, f w] the control image in [0, 1], f = `hint_factor`."""
        emb, _ = self.embed(x, timesteps, y)
        dtype = emb.dtype
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))
        outs = []
        for i, (block, zero_conv) in enumerate(
            zip(self.input_blocks, self.zero_convs, strict=True)
        ):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
