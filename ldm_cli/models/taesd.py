"""TAESD, madebyollin's tiny autoencoder (taesd, taesdxl, taesd3, taef1), with its original names.

``TAESDDecoder().state_dict()`` has exactly the keys of ``taesd_decoder.safetensors`` and
``TAESDEncoder().state_dict()`` those of ``taesd_encoder.safetensors``: both are
``nn.Sequential`` numbered as the original, a plain stack of 64-channel 3x3 convs and
conv-ReLU residual blocks, no norms and no attention.

Latents are those the denoiser works in, scaled (and shifted) already: TAESD was trained on
``(z - shift_factor) * scale_factor``, so unlike ``vae.AutoencoderKL`` it takes the sampler's
latents as they are. Images are in [-1, 1], as for the full VAE; inside, TAESD works in [0, 1].
The results equal diffusers' ``AutoencoderTiny.decode(...).sample`` and ``.encode(...).latents``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.errors import UserError

# The decoder squashes its input smoothly into (-3, 3): latents beyond that are noise anyway.
LATENT_LIMIT = 3.0


@dataclass(frozen=True)
class TAESDConfig:
    latent_channels: int = 4  # 4 for taesd and taesdxl, 16 for taesd3 and taef1
    channels: int = 64
    image_channels: int = 3
    # residual blocks per resolution, from the image side down / from the latents up
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    name: str = "taesd"

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + x), with a 1x1 ``skip`` where the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(in_channels, out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
        )
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the conv output is fresh and not needed for its own backward: safe to add in place
        return F.relu_(self.conv(x).add_(self.skip(x)))


class TanhClamp(nn.Module):
    """Layer 0 of the original decoder: no weights, but it fixes the numbering of the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / LATENT_LIMIT) * LATENT_LIMIT


class TAESDDecoder(nn.Sequential):
    """Latents -> image in [-1, 1], at ``config.downscale`` times their size."""

    def __init__(self, config: TAESDConfig):
        width = config.channels
        layers: list[nn.Module] = [
            TanhClamp(),
            conv3x3(config.latent_channels, width),
            nn.ReLU(inplace=True),
        ]
        last = len(config.decoder_blocks) - 1
        for level, count in enumerate(config.decoder_blocks):
            layers += [Block(width, width) for _ in range(count)]
            if level < last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                layers.append(conv3x3(width, width, bias=False))
        layers.append(conv3x3(width, config.image_channels))
        super().__init__(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return super().forward(latents).mul_(2).sub_(1)  # TAESD's [0, 1] to [-1, 1]


class TAESDEncoder(nn.Sequential):
    """Image in [-1, 1] -> latents, ``config.downscale`` times smaller."""

    def __init__(self, config: TAESDConfig):
        width = config.channels
        layers: list[nn.Module] = []
        for level, count in enumerate(config.encoder_blocks):
            if level == 0:
                layers.append(conv3x3(config.image_channels, width))
            else:
                layers.append(conv3x3(width, width, stride=2, bias=False))
            layers += [Block(width, width) for _ in range(count)]
        layers.append(conv3x3(width, config.latent_channels))
        super().__init__(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image.add(1).div(2))  # [-1, 1] to TAESD's [0, 1]


class TinyAutoencoder(nn.Module):
    """A TAESD: either part may be missing, as madebyollin ships them as separate files."""

    def __init__(self, config: TAESDConfig, has_encoder: bool = True, has_decoder: bool = True):
        super().__init__()
        if not (has_encoder or has_decoder):
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both")
        self.config = config
        self.encoder = TAESDEncoder(config) if has_encoder else None
        self.decoder = TAESDDecoder(config) if has_decoder else None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise UserError(f"{self.config.name} has no decoder (only an encoder was loaded)")
        return self.decoder(latents)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise UserError(f"{self.config.name} has no encoder (only a decoder was loaded)")
        return self.encoder(image)
