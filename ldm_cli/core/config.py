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
    # latents are (z - shift_factor) * scale_factor (SD3, FLUX); 0 for SD 1.x/2.x/XL
    shift_factor: float = 0.0
    # quant_conv / post_quant_conv 1x1 convolutions (absent from the SD3 and FLUX VAEs)
    use_quant_conv: bool = True

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
    # "clip": transformers-layout CLIP (cond_stage_model.transformer.text_model.*, SD 1.x);
    # "openclip": open_clip layout (cond_stage_model.model.*, SD 2.x, the x4 upscaler)
    kind: str = "clip"
    # openclip only: output width of text_projection (None: hidden_size)
    projection_dim: int | None = None

    def __post_init__(self):
        if self.kind not in ("clip", "openclip"):
            raise ValueError(f"text encoder kind must be 'clip' or 'openclip', got {self.kind!r}")


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
    prediction: str = "eps"  # "eps", "v", or "flow" (velocity of a rectified flow)
    # "flow" only: the static shift of its sigmas (samplers.flow; SD3 uses 3)
    flow_shift: float = 1.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    default_size: int = 512
    # The guidance scale `ldm upscale` uses when --cfg is not given (a model trained for another
    # scale names it in its ldm_config metadata: the embedded upscaler's is 1).
    default_cfg: float = 7.5
    # SDXL (SGM layout): the text encoders live under `conditioner.embedders.N` instead of
    # `cond_stage_model`: `text` is embedders.0, `text2` (when set) embedders.1.
    conditioner: bool = False
    text2: TextConfig | None = None

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)

    @property
    def text_encoders(self) -> tuple[TextConfig, ...]:
        """Every text encoder, in checkpoint order (embedders.0, embedders.1)."""
        return (self.text,) if self.text2 is None else (self.text, self.text2)


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

# The SD x4 upscaler (yaml/x4-upscaling.yaml). The U-Net takes the latents concatenated with the
# noise-augmented low-resolution RGB image, so latents have the low-res image's size and the f=4
# VAE decodes them at 4x; the augmentation's noise level is its class label (label_emb).
X4_UPSCALER = ModelConfig(
    family="x4-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=256,
        channel_mult=(1, 2, 2, 4),
        attention_resolutions=(8, 4, 2),
        num_heads=8,
        transformer_depth=(0, 1, 1, 1),
        context_dim=1024,
        use_linear_in_transformer=True,
        num_classes=1000,
        disable_self_attentions=(True, True, True, False),
    ),
    vae=VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333),
    # OpenCLIP ViT-H/14, penultimate layer (FrozenOpenCLIPEmbedder, layer "penultimate")
    text=TextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="gelu",
        pad_token_id=0,
        clip_skip=2,
        kind="openclip",
        projection_dim=1024,
    ),
    prediction="v",
    schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
    default_size=512,  # 128x128 latents, from 128x128 inputs
)

# A tiny x4-upscaler-shaped configuration (CLIP text tower) for fast tests.
TINY_X4 = ModelConfig(
    family="x4-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(4, 2),
        num_heads=2,
        transformer_depth=(0, 1, 1),
        context_dim=32,
        use_linear_in_transformer=True,
        num_classes=1000,
        disable_self_attentions=(True, True, False),
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, scale_factor=0.08333),
    text=TINY_SD1.text,
    prediction="v",
    schedule=X4_UPSCALER.schedule,
    default_size=64,
)


# SD 2.x: OpenCLIP ViT-H/14 text tower (its penultimate layer), 64-dim heads, linear proj_in.
OPENCLIP_H_TEXT = TextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    hidden_act="gelu",
    pad_token_id=0,
    clip_skip=2,
    kind="openclip",
    projection_dim=1024,
)
SD2 = ModelConfig(  # 2.0-base / 2.1-base (v2-inference.yaml)
    family="sd2",
    unet=replace(SD15.unet, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(),
    text=OPENCLIP_H_TEXT,
    prediction="eps",
    default_size=512,
)
SD21 = SD2.with_(prediction="v", default_size=768)  # 2.0 / 2.1 768-v (v2-inference-v.yaml)
SD2_INPAINT = SD2.with_(family="sd2-inpaint", unet=replace(SD2.unet, in_channels=9))

# A tiny SD 2.x-shaped v-prediction model whose heads are 64 wide like the real ones, so its
# architecture is read back from tensor shapes alone.
TINY_SD2 = ModelConfig(
    family="sd2",
    unet=replace(
        TINY_SD1.unet,
        model_channels=64,
        num_heads=8,  # unused beside num_head_channels; 8 as detection assumes
        num_head_channels=64,
        context_dim=64,
        use_linear_in_transformer=True,
    ),
    vae=TINY_SD1.vae,
    text=replace(
        OPENCLIP_H_TEXT,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=1,
        projection_dim=32,
    ),
    prediction="v",
    default_size=64,
)

# SDXL (yaml/sd_xl_base.yaml): CLIP ViT-L and OpenCLIP ViT-bigG/14, both read at their
# penultimate layer *without* a final layer norm (SGM's layer "hidden"/"penultimate"), their
# features concatenated to 2048; the bigG pooled output and the micro-conditioning sizes make
# the 2816-wide ADM vector of `label_emb` (see ldm_cli.pipeline.tasks.sdxl).
SDXL_CLIP_L_TEXT = TextConfig(clip_skip=2)
OPENCLIP_BIGG_TEXT = TextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    pad_token_id=0,
    clip_skip=2,
    kind="openclip",
    projection_dim=1280,
)
SDXL_VAE = VAEConfig(scale_factor=0.13025)
SDXL_BASE = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        num_head_channels=64,
        transformer_depth=(0, 2, 10),  # the yaml's 1 at level 0 is unused: no attention at ds 1
        transformer_depth_middle=10,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,  # pooled 1280 + 6 sizes x 256
    ),
    vae=SDXL_VAE,
    text=SDXL_CLIP_L_TEXT,
    text2=OPENCLIP_BIGG_TEXT,
    conditioner=True,
    default_size=1024,
)
SDXL_INPAINT = SDXL_BASE.with_(family="sdxl-inpaint", unet=replace(SDXL_BASE.unet, in_channels=9))
# The refiner (sd_xl_refiner.yaml): bigG alone (conditioner.embedders.0), a wider U-Net with
# attention at levels 1-2 only, and an ADM vector of pooled 1280 + 5 x 256 (original size,
# crop, aesthetic score).
SDXL_REFINER = ModelConfig(
    family="sdxl-refiner",
    unet=UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        attention_resolutions=(4, 2),
        num_head_channels=64,
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4,
        context_dim=1280,
        use_linear_in_transformer=True,
        adm_in_channels=2560,
    ),
    vae=SDXL_VAE,
    text=OPENCLIP_BIGG_TEXT,
    conditioner=True,
    default_size=1024,
)

# Tiny SDXL-shaped models with 64-dim heads (so shapes alone give back the architecture) and
# 8-wide size embeddings instead of 256 (ldm_cli.pipeline.tasks.sdxl reads that width from the
# ADM width).
TINY_SDXL_CLIP_L_TEXT = replace(
    SDXL_CLIP_L_TEXT,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=1,
)
TINY_BIGG_TEXT = replace(
    OPENCLIP_BIGG_TEXT,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=2,
    projection_dim=96,
)
TINY_SDXL = SDXL_BASE.with_(
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=64,
        transformer_depth=(0, 2),
        transformer_depth_middle=2,
        context_dim=64 + 128,
        use_linear_in_transformer=True,
        adm_in_channels=96 + 6 * 8,
    ),
    vae=replace(TINY_SD1.vae, scale_factor=SDXL_VAE.scale_factor),
    text=TINY_SDXL_CLIP_L_TEXT,
    text2=TINY_BIGG_TEXT,
    default_size=64,
)
TINY_SDXL_REFINER = SDXL_REFINER.with_(
    unet=replace(TINY_SDXL.unet, context_dim=128, adm_in_channels=96 + 5 * 8),
    vae=TINY_SDXL.vae,
    text=TINY_BIGG_TEXT,
    default_size=64,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": SD15,
    "sd15-inpaint": SD15_INPAINT,
    "tiny-sd1": TINY_SD1,
    "x4-upscaler": X4_UPSCALER,
    "tiny-x4": TINY_X4,
}
