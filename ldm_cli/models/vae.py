"""The KL-regularised autoencoder of latent diffusion, with the original CompVis module names.

``AutoencoderKL(cfg).state_dict()`` has exactly the keys found under ``first_stage_model.`` in an
original Stable Diffusion checkpoint, so such a checkpoint loads without any key conversion.
Latents given to ``decode`` and returned by ``encode`` are unscaled; the pipeline applies
``cfg.scale_factor`` (and ``cfg.shift_factor``).

Every module is built without data-dependent initialisation, so the whole model can be created
under ``torch.device("meta")`` and filled with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.config import VAEConfig
from ldm_cli.ops.attention_slicing import attention
from ldm_cli.ops.channels_last import decode_channels_last, is_channels_last
from ldm_cli.ops.strip_conv import norm_silu_conv, use_strips
from ldm_cli.ops.upsample_conv import FoldedUpsample
from ldm_cli.ops.winograd_conv import WinogradConv2d, winograd_tile

GROUP_NORM_EPS = 1e-6


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, affine=True)


def silu_(x: torch.Tensor) -> torch.Tensor:
    # Always applied to a fresh norm output, so working in place saves an allocation; autograd
    # keeps silu_ differentiable.
    return F.silu(x, inplace=True)


class ResnetBlock(nn.Module):
    """norm-silu-conv twice plus a skip (a 1x1 ``nin_shortcut`` when the width changes).

    Its 3x3 convolutions, like ``conv_in`` and ``conv_out``, can take the opt-in Winograd path
    (see ``winograd_conv``). Big inputs at inference go through ``strip_conv`` instead, which
    never holds a full-size normalised copy."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = WinogradConv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = WinogradConv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._strips(x, self.conv1):
            h = norm_silu_conv(x, self.norm1, self.conv1)
        else:
            h = self.conv1(silu_(self.norm1(x)))
        if self._strips(h, self.conv2):
            return norm_silu_conv(h, self.norm2, self.conv2, residual=self._skip_rows(x))
        h = self.conv2(silu_(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        # conv2's output is not needed for its backward, so adding in place is safe
        return h.add_(skip)

    @staticmethod
    def _strips(x: torch.Tensor, conv: nn.Conv2d) -> bool:
        return use_strips(x, conv) and not winograd_tile(x, conv.weight)

    def _skip_rows(self, x: torch.Tensor):
        if self.nin_shortcut is None:
            return lambda r0, r1: x[:, :, r0:r1]
        return lambda r0, r1: self.nin_shortcut(x[:, :, r0:r1])


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, channels as the feature axis."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def as_sequence(t: torch.Tensor) -> torch.Tensor:
            # (b, c, h, w) -> (b, 1, h*w, c) with channels innermost. SDPA's fused kernels
            # need a unit stride there; a strided view sends it to the math kernel, whose
            # h*w x h*w scores take 2.3 GiB more at a 128 x 128 latent (measured on CPU).
            return t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)

        out = attention(as_sequence(self.q(h)), as_sequence(self.k(h)), as_sequence(self.v(h)))
        if is_channels_last(x):  # (b, h*w, c) is already NHWC memory: a view, no copy
            out = out.squeeze(1).view(b, height, width, c).permute(0, 3, 1, 2)
        else:
            out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(FoldedUpsample):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv (computed as
    four 2x2 convolutions on the small input: see ``upsample_conv``)."""


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: resnet blocks, each optionally followed by attention.

    The resampler is attached by the owner as ``downsample`` (encoder) or ``upsample``
    (decoder), matching the original attribute names; the last level has none.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, attn: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(depth)
        )
        # Empty (and so absent from the state dict) unless this resolution has attention.
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, groups) for _ in range(depth if attn else 0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        groups = cfg.norm_groups
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = WinogradConv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_width, resolution = cfg.ch, cfg.resolution
        for i, width in enumerate(widths):
            level = Level(
                in_width, width, cfg.num_res_blocks, resolution in cfg.attn_resolutions, groups
            )
            if i != len(widths) - 1:
                level.downsample = Downsample(width)
                resolution //= 2
            self.down.append(level)
            in_width = width
        self.mid = MidBlock(in_width, groups)
        self.norm_out = group_norm(in_width, groups)
        out_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = WinogradConv2d(in_width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(silu_(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        groups = cfg.norm_groups
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_width = widths[-1]
        resolution = cfg.resolution // cfg.downscale
        self.conv_in = WinogradConv2d(cfg.z_channels, in_width, 3, padding=1)
        self.mid = MidBlock(in_width, groups)
        # Built from the lowest resolution up, but stored so that up[i] has width widths[i],
        # as in the original (which inserted each new level at the front of the list).
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            level = Level(
                in_width,
                widths[i],
                cfg.num_res_blocks + 1,
                resolution in cfg.attn_resolutions,
                groups,
            )
            if i != 0:
                level.upsample = Upsample(widths[i])
                resolution *= 2
            levels.insert(0, level)
            in_width = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(in_width, groups)
        self.conv_out = WinogradConv2d(in_width, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if decode_channels_last(z, self):  # see channels_last
            z = z.contiguous(memory_format=torch.channels_last)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(silu_(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: an independent Gaussian per latent element."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the generator's own device, so a CPU generator gives the same latents
        # whatever device the model runs on.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over all but the batch axis."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z_moments = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(z_moments, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        else:  # SD3 and FLUX: the moments are the encoder's output as they are
            self.quant_conv = self.post_quant_conv = nn.Identity()

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image in [-1, 1] -> posterior over unscaled latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> image, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
