"""The architecture of the embedded default model, the training recipe it was made with, and
the configurations ``ldm train --config`` accepts.

EMBEDDED is SD 1.x in shape (same module layout and key names, eps prediction, SD's schedule)
but sized for 64 px images of the shapes domain and for CPU training: an f=4 VAE (16x16x4
latents), a 2-layer 64-wide CLIP text encoder on the full 49,408-token vocabulary, and a
3-level U-Net with cross-attention at 8x8 and 4x4.

The U-Net is as wide at 16x16 as at 8x8 (64 channels, not the usual 32 -> 64 doubling): the
first version (32 channels there) placed and coloured objects right but drew every shape as
a blob, and the 16x16 level is where a shape's corners are drawn. Sampling costs the same (a
batch of two at 16x16 is bound by per-layer overhead, not arithmetic); training 1.3x.

No torch here: the CLI reads these defaults while building ``ldm --help``.
"""

from __future__ import annotations

from pathlib import Path

from ldm_cli.core.config import PRESETS, X4_UPSCALER, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ldm_cli.core.errors import UserError

EMBEDDED = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_resolutions=(4, 2),
        num_heads=4,
        transformer_depth=(0, 1, 1),
        transformer_depth_middle=1,
        context_dim=64,
        norm_groups=8,
    ),
    # 24 base channels, not 16: at 16 the round trip turned most small stars into triangles.
    # 8 groups, not 32: with one or two channels per group GroupNorm erases the absolute colour
    # of flat regions, and this VAE then takes far longer to learn even the background.
    vae=VAEConfig(ch=24, ch_mult=(1, 2, 4), num_res_blocks=1, resolution=64, norm_groups=8),
    # The U-Net reads the first layer's output (clip_skip 2, through the final layer norm): a
    # linear probe recovers an object's colour from its shape token there for 88% of the
    # colour-shape pairs held out of training, against 78% at the last layer
    # (ldm_cli.evaluation.text_probe), and the U-Net trained on it draws held-out pairs in the
    # asked colour more often: 81% against 75% (weights/README.md).
    text=TextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        clip_skip=2,
    ),
    prediction="eps",
    default_size=64,
    # Guidance beyond ~3 exaggerates what tells the shapes apart (at 7.5 a large circle comes
    # out as a rounded diamond): on 200 validation prompts (`ldm eval --seed 1`) shape accuracy
    # was 68.1% at 7.5, 72.0% at 5, 73.6% at 3 and 72.6% at 2, so `ldm generate` uses 3.
    default_cfg=3.0,
)

# The recipe for EMBEDDED on ~20,000 shapes images with 2 CPU cores (see `ldm train --help`):
# 96 minutes on a 2-core AVX-512 Xeon for the previous model (its U-Net on the last text
# layer); the shipped U-Net is that one retrained on the first layer with `--base`, UNET_STEPS
# at a peak learning rate of 5e-4 (weights/README.md, "Reproduce"). Shortened to 1600/1500/5000
# steps the recipe lost colour and place on the held-out pairs ("Earlier models" there).
VAE_STEPS = 2400
VAE_BATCH = 32
VAE_LR = 1e-3
TEXT_STEPS = 2000
TEXT_BATCH = 64
TEXT_LR = 1e-3
UNET_STEPS = 9000
UNET_BATCH = 64
UNET_LR = 1e-3

# The embedded x4 upscaler: the x4 architecture (7 input channels, noise-level class labels,
# cross-attention-only at 8x8, v-prediction on the upscaler's schedule) sized like EMBEDDED. It
# upscales 16x16 to 64x64 through EMBEDDED's f=4 VAE and text encoder, which `ldm train --config
# embedded-x4` takes frozen from --base; their shapes replace the `vae` and `text` here.
# Its 16x16 level is 64 wide for the reason EMBEDDED's is: the first version (32 there) drew
# small shapes wrong and lost to bicubic by 1.4 dB.
EMBEDDED_X4 = ModelConfig(
    family="x4-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=64,
        channel_mult=(1, 1, 2),
        num_res_blocks=2,
        attention_resolutions=(4, 2),
        num_heads=4,
        transformer_depth=(0, 1, 1),
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=True,
        num_classes=1000,
        disable_self_attentions=(True, True, False),
        norm_groups=8,
    ),
    vae=EMBEDDED.vae,
    text=EMBEDDED.text,
    prediction="v",
    schedule=X4_UPSCALER.schedule,
    default_size=64,
    # Guidance only hurts this small model's fidelity (held-out PSNR falls as the scale grows:
    # weights/README.md), so `ldm upscale` runs it unguided unless --cfg says otherwise.
    default_cfg=1.0,
)


def _trainable(cfg: ModelConfig) -> bool:
    """Not an inpainting layout (a U-Net taking the masked image's extra channels): `ldm train`
    makes text-to-image models and x4 upscalers only."""
    from ldm_cli.checkpoints.detect import is_upscaler_unet

    return cfg.unet.in_channels == cfg.unet.out_channels or is_upscaler_unet(cfg.unet)


CONFIGS: dict[str, ModelConfig] = {
    name: cfg
    for name, cfg in {"embedded": EMBEDDED, "embedded-x4": EMBEDDED_X4, **PRESETS}.items()
    if _trainable(cfg)
}


def training_config(name: str) -> ModelConfig:
    """A preset by name (``embedded``, ``tiny-sd1``, ...) or a JSON file of a ModelConfig."""
    if name in CONFIGS:
        return CONFIGS[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        from ldm_cli.checkpoints.detect import config_from_json

        cfg = config_from_json(path.read_text(encoding="utf-8"))
        if not _trainable(cfg):
            raise UserError(
                f"--config {name}: its U-Net takes {cfg.unet.in_channels} channels (an inpainting "
                "layout); ldm train makes text-to-image models and x4 upscalers only"
            )
        return cfg
    raise UserError(
        f"unknown --config {name!r}; use one of {', '.join(CONFIGS)} or a .json config file"
    )
