"""Frozen configurations of the flow-matching models: FLUX.1 and Stable Diffusion 3/3.5.

Field names follow the originals: Black Forest Labs' ``FluxParams`` (flux/model.py), Stability's
``MMDiTX`` arguments (sd3 reference mmditx.py) and transformers' ``T5Config``, so each can be
held next to its source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ldm_cli.core.config import OPENCLIP_BIGG_TEXT, TextConfig, VAEConfig


@dataclass(frozen=True)
class FluxConfig:
    """FLUX.1's double- and single-stream transformer (BFL's ``FluxParams``)."""

    in_channels: int = 64  # 16 latent channels x a 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE widths of (text index, row, column)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # [dev]: distilled guidance input; [schnell]: none


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3's MMDiT; with `x_block_self_attn_layers` SD 3.5 Medium's MMDiT-X (a second
    self-attention on the image stream of those blocks)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    depth: int = 24  # joint blocks; hidden width is 64 x depth in every released model
    hidden_size: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    pos_embed_max_size: int = 192  # the stored pos_embed covers this many patches per side
    adm_in_channels: int = 2048  # CLIP-L + CLIP-G pooled
    context_in_dim: int = 4096  # T5-XXL width (the CLIP features are zero-padded to it)
    qk_norm: bool = False  # RMSNorm on q and k (SD 3.5: ln_q / ln_k)
    x_block_self_attn_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class T5Config:
    """The T5 v1.1 encoder (transformers' ``T5Config`` field names)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"


@dataclass(frozen=True)
class FlowModelConfig:
    """A whole flow-matching model: transformer, 16-channel VAE and text encoders.

    `shift` is the timestep shift of the sigmas (SD3: 3.0; FLUX schnell: 1.0, none); with
    `dynamic_shift` (FLUX dev) it depends on the image's token count instead (diffusers'
    ``calculate_shift``: mu from 0.5 at 256 tokens to 1.15 at 4096). `guidance_embed` models
    take the guidance scale as an input (`default_guidance`) and need no unconditional pass.
    """

    family: str  # "flux-dev", "flux-schnell", "sd3"
    transformer: FluxConfig | MMDiTConfig
    vae: VAEConfig
    clip_l: TextConfig
    t5: T5Config | None  # None: an SD3 file without T5 (zeros in its place)
    clip_g: TextConfig | None = None  # SD3 only
    t5_tokens: int = 512
    shift: float = 1.0
    dynamic_shift: bool = False
    default_size: int = 1024
    default_steps: int = 28
    default_cfg: float = 1.0
    default_guidance: float | None = None

    def with_(self, **changes) -> FlowModelConfig:
        return replace(self, **changes)

    @property
    def is_flux(self) -> bool:
        return isinstance(self.transformer, FluxConfig)

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels


FLUX_VAE = VAEConfig(
    z_channels=16,
    embed_dim=16,
    attn_resolutions=(),
    scale_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
)
SD3_VAE = replace(FLUX_VAE, scale_factor=1.5305, shift_factor=0.0609)

# FLUX.1 [dev] and [schnell] read CLIP-L's pooled output (no projection) and T5 features.
FLUX_CLIP_L = TextConfig()
# SD3 reads both CLIPs at the penultimate layer (not final-normed) and their projected pooled
# outputs (CLIPTextModelWithProjection); CLIP-L pads with the end token, CLIP-G with 0 ("!").
SD3_CLIP_L = TextConfig(clip_skip=2, projection_dim=768)
SD3_CLIP_G = replace(OPENCLIP_BIGG_TEXT, kind="clip", pad_token_id=0, projection_dim=1280)

FLUX_DEV = FlowModelConfig(
    family="flux-dev",
    transformer=FluxConfig(),
    vae=FLUX_VAE,
    clip_l=FLUX_CLIP_L,
    t5=T5Config(),
    t5_tokens=512,
    shift=1.0,
    dynamic_shift=True,
    default_steps=28,
    default_cfg=1.0,
    default_guidance=3.5,
)
FLUX_SCHNELL = FLUX_DEV.with_(
    family="flux-schnell",
    transformer=FluxConfig(guidance_embed=False),
    t5_tokens=256,
    dynamic_shift=False,
    default_steps=4,
    default_guidance=None,
)
SD35_MEDIUM = FlowModelConfig(
    family="sd3",
    transformer=MMDiTConfig(
        depth=24,
        hidden_size=1536,
        num_heads=24,
        pos_embed_max_size=384,
        qk_norm=True,
        x_block_self_attn_layers=tuple(range(13)),
    ),
    vae=SD3_VAE,
    clip_l=SD3_CLIP_L,
    clip_g=SD3_CLIP_G,
    t5=T5Config(),
    t5_tokens=256,
    shift=3.0,
    default_steps=40,
    default_cfg=4.5,
)
SD35_LARGE = SD35_MEDIUM.with_(
    transformer=MMDiTConfig(
        depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True
    ),
    default_cfg=3.5,
)
SD3_MEDIUM = SD35_MEDIUM.with_(
    transformer=MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192),
    default_steps=28,
    default_cfg=7.0,
)

FLOW_FAMILY_NAMES = {
    "flux-dev": "FLUX.1 [dev]",
    "flux-schnell": "FLUX.1 [schnell]",
    "sd3": "Stable Diffusion 3",
}
