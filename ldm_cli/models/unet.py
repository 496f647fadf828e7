"""The latent diffusion U-Net, laid out as the original CompVis/SGM ``openaimodel.UNetModel``.

``UNetModel(cfg).state_dict()`` has exactly the keys that follow ``model.diffusion_model.`` in an
original checkpoint, so those weights load directly (``load_state_dict(sd, assign=True)`` on a
model built under ``torch.device("meta")``).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.config import UNetConfig
from ldm_cli.models.attention import BasicTransformerBlock, SpatialTransformer
from ldm_cli.models.unet_blocks import (
    RESBLOCK_GROUPNORM_EPS,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
)

TIME_EMBED_MULT = 4


def _check_config(cfg: UNetConfig) -> None:
    levels = len(cfg.channel_mult)
    if len(cfg.transformer_depth) != levels:
        raise ValueError(f"transformer_depth needs one entry per level ({levels})")
    if cfg.disable_self_attentions is not None and len(cfg.disable_self_attentions) != levels:
        raise ValueError(f"disable_self_attentions needs one entry per level ({levels})")
    if cfg.adm_in_channels is not None and cfg.num_classes is not None:
        raise ValueError("adm_in_channels and num_classes are mutually exclusive")


class UNetEncoder(nn.Module):
    """The time (and label) embedding, input blocks and middle block that the U-Net and a
    ControlNet (`models.controlnet`) build alike, with the original key names."""

    def _build_encoder(self, cfg: UNetConfig) -> list[int]:
        """Set time_embed, label_emb, input_blocks and middle_block; the input blocks' output
        channels (the U-Net's skips)."""
        _check_config(cfg)
        self.config = cfg
        model_channels = cfg.model_channels
        time_embed_dim = model_channels * TIME_EMBED_MULT

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.label_emb: nn.Module | None = None
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
        elif cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if self._has_attention(level, ds):
                    layers.append(self._transformer(ch, cfg.transformer_depth[level], level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        middle: list[nn.Module] = [self._resblock(ch, ch)]
        if cfg.transformer_depth_middle > 0:
            middle.append(self._transformer(ch, cfg.transformer_depth_middle, level=None))
        middle.append(self._resblock(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)
        return skip_channels

    def _resblock(self, channels: int, out_channels: int) -> ResBlock:
        cfg = self.config
        emb_channels = cfg.model_channels * TIME_EMBED_MULT
        return ResBlock(channels, emb_channels, out_channels, cfg.norm_groups)

    def embed(self, x: torch.Tensor, timesteps, y: torch.Tensor | None):
        """(timestep embedding [B, D] plus the label's, the timesteps [B]) in the model dtype."""
        if (y is None) != (self.label_emb is None):
            raise ValueError("y must be given exactly when the model has a label embedding")
        dtype = self.time_embed[0].weight.dtype
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=x.device)
        # A scalar or single timestep is shared by the whole batch.
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(dtype)
        emb = self.time_embed(t_emb)
        if self.label_emb is not None:
            if y.is_floating_point():
                y = y.to(dtype)
            emb = emb + self.label_emb(y).to(dtype)
        return emb, timesteps

    def _has_attention(self, level: int, ds: int) -> bool:
        return ds in self.config.attention_resolutions and self.config.transformer_depth[level] > 0

    def _transformer(self, ch: int, depth: int, level: int | None) -> SpatialTransformer:
        cfg = self.config
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        # The middle block never disables self-attention (disable_middle_self_attn is False in
        # every released config).
        disable_self_attn = (
            level is not None
            and cfg.disable_self_attentions is not None
            and cfg.disable_self_attentions[level]
        )
        return SpatialTransformer(
            ch,
            heads,
            dim_head,
            depth,
            cfg.context_dim,
            disable_self_attn=disable_self_attn,
            use_linear=cfg.use_linear_in_transformer,
            norm_groups=cfg.norm_groups,
        )


class UNetModel(UNetEncoder):
    """Predicts eps (or v) from a noisy latent, its timestep, text context and optional ``y``.

    ``y`` is the SDXL micro-conditioning vector (``adm_in_channels`` wide) or, for the x4
    upscaler, integer noise-level labels (``num_classes``). ``control`` adds a ControlNet's
    residuals: one per input block (added to its skip) and one for the middle block.
    """

    # Set for the duration of a run through `use_feature_cache` (runtime.deep_cache,
    # --deep-cache); None: every call computes every block.
    feature_cache = None
    # Set through `use_token_merger` (runtime.token_merging, --token-merging); None: off.
    token_merger = None

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        skip_channels = self._build_encoder(cfg)
        model_channels = cfg.model_channels
        ch = skip_channels[-1]
        ds = 2 ** (len(cfg.channel_mult) - 1)
        resblock = self._resblock

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if self._has_attention(level, ds):
                    layers.append(self._transformer(ch, cfg.transformer_depth[level], level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        adapter: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`control`: ControlNet residuals, one per skip and one for the middle. `adapter`:
        T2I-Adapter features, one per level and maybe one for the middle (`adapter_points`)."""
        emb, timesteps = self.embed(x, timesteps, y)
        dtype = emb.dtype
        if context is not None:
            context = context.to(dtype)

        h = x.to(dtype)
        cache = self.feature_cache
        if control is not None and cache is not None:
            raise ValueError("ControlNet residuals and the feature cache exclude each other")
        reuse = cache is not None and cache.reusable(h)
        inputs = self.input_blocks[: cache.depth] if reuse else self.input_blocks
        batch = h.shape[0]
        guided = control is not None or adapter is not None
        repeats = 1 if guided else self._repeated_rows(h, timesteps, context)
        h = h[: batch // repeats]
        skips = []
        features = dict(zip(self.adapter_points(), adapter or [], strict=False))
        for i, block in enumerate(inputs):
            h = block(h, emb, context, repeats)
            repeats = batch // h.shape[0]
            if i in features:
                h = h + features[i].to(dtype)
            skips.append(h)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control needs {len(skips) + 1} residuals, got {len(control)}")
            skips = [s + r.to(dtype) for s, r in zip(skips, control[:-1], strict=True)]
        if reuse:
            h = cache.features
            outputs = self.output_blocks[len(self.output_blocks) - cache.depth :]
        else:
            h = self.middle_block(h, emb, context, repeats)
            if h.shape[0] != batch:  # no cross-attention anywhere before here
                h = h.repeat(batch // h.shape[0], 1, 1, 1)
            if control is not None:
                h = h + control[-1].to(dtype)
            rest = (adapter or [])[len(features) :]
            if rest and rest[0].shape == h.shape:  # SDXL adapters' last feature
                h = h + rest[0].to(dtype)
            outputs = self.output_blocks
        for i, block in enumerate(outputs):
            if cache is not None and not reuse and i == len(outputs) - cache.depth:
                cache.store(h)
            skip = skips.pop()
            if skip.shape[0] != batch:  # computed once for the repeated rows
                skip = skip.repeat(batch // skip.shape[0], 1, 1, 1)
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)

    def adapter_points(self) -> list[int]:
        """The input blocks after which T2I-Adapter features are added, one per level, as
        diffusers adds them: after a level's last res block where it has attention, else after
        its last block (its downsampling, where it has one)."""
        cfg, points = self.config, []
        for level in range(len(cfg.channel_mult)):
            last_res = 1 + level * (cfg.num_res_blocks + 1) + cfg.num_res_blocks - 1
            has_down = level < len(cfg.channel_mult) - 1
            attention = self._has_attention(level, 2**level)
            points.append(last_res if attention or not has_down else last_res + 1)
        return points

    def use_feature_cache(self, cache) -> None:
        """Reuse deep features between calls as `cache` says (runtime.deep_cache); None: off."""
        self.feature_cache = cache

    def use_token_merger(self, merger) -> None:
        """Merge self-attention tokens in every transformer block with `merger`
        (runtime.token_merging); None: off."""
        self.token_merger = merger
        for block in self.modules():
            if isinstance(block, BasicTransformerBlock):
                block.token_merger = merger

    def _repeated_rows(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None
    ) -> int:
        """r > 1 when the batch is r copies of its first rows in everything but ``context``:
        the cond/uncond halves of a classifier-free guidance batch. Every layer before the
        first cross-attention then sees the same input for each copy, so it runs on one copy
        (at 512x512 SD 1.5 that is the first ResBlock and the 4096-token self-attention, ~5%
        of a call). Only on the CPU, where the check costs no device sync; not with a label
        embedding (SDXL's differs per prompt), the feature cache, token merging or compile.
        """
        batch = x.shape[0]
        if (
            batch < 2
            or context is None
            or x.device.type != "cpu"
            or self.label_emb is not None
            or self.feature_cache is not None
            or self.token_merger is not None
            or torch.compiler.is_compiling()
        ):
            return 1
        for repeats in range(batch, 1, -1):
            rows = batch // repeats
            if batch % repeats == 0 and all(
                torch.equal(t[:rows].expand(repeats, *t[:rows].shape).reshape(t.shape), t)
                for t in (x, timesteps)
            ):
                return repeats
        return 1


def unet_param_count(cfg: UNetConfig) -> int:
    """Number of parameters of ``UNetModel(cfg)``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = UNetModel(cfg)
    return sum(p.numel() for p in model.parameters())
