"""Frozen architecture configurations and the presets of the known model families.

Field names follow the original LDM/SGM configs (``openaimodel.UNetModel``,
``AutoencoderKL`` ddconfig) so a reader can hold them next to the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # downsampling factors (1, 2, 4, ...) at which spatial transformers are inserted
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8  # used when num_head_channels == -1 (SD 1.x)
    num_head_channels: int = -1  # SD 2.x / XL: fixed 64-dim heads
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 where no attention
    transformer_depth_middle: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    # SDXL micro-conditioning vector width (label_emb, "sequential"); None = absent
    adm_in_channels: int | None = None
    # x4 upscaler: noise-level class embedding (label_emb as nn.Embedding); None = absent
    num_classes: int | None = None
    # x4 upscaler: per-level switch that makes attn1 a cross-attention too
    disable_self_attentions: tuple[bool, ...] | None = None
    norm_groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    norm_groups: int = 32
    scale_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer (transformers' CLIPTextConfig fields)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # token used to pad prompts to 77: 49407 (end token) for SD 1.x, 0 for OpenCLIP encoders
    pad_token_id: int = 49407
    # how many final layers to skip; 1 = last layer (SD 1.x), 2 = penultimate (SD 2.x, XL)
    clip_skip: int = 1


@dataclass(frozen=True)
class ScheduleConfig:
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class ModelConfig:
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    prediction: str = "eps"  # "eps" or "v"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    default_size: int = 512

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


SD15 = ModelConfig(
    family="sd1",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text=TextConfig(),
    default_size=512,
)

SD15_INPAINT = SD15.with_(family="sd1-inpaint", unet=replace(SD15.unet, in_channels=9))

# A tiny SD 1.x-shaped configuration for fast tests (same code paths, few channels).
TINY_SD1 = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_heads=2,
        transformer_depth=(1, 1),
        context_dim=32,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    ),
    default_size=64,
)

PRESETS: dict[str, ModelConfig] = {"sd15": SD15, "sd15-inpaint": SD15_INPAINT, "tiny-sd1": TINY_SD1}
