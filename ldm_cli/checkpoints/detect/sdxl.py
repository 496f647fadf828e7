"""SDXL checkpoints (SGM layout: ``conditioner.embedders.N``), read from their tensor shapes.

* base: ``embedders.0`` CLIP ViT-L (``transformer.text_model.*``) and ``embedders.1`` OpenCLIP
  bigG (``model.*``); a 4-channel U-Net is ``sdxl``, a 9-channel one ``sdxl-inpaint``;
* refiner: ``embedders.0`` the bigG tower alone (``model.*``): ``sdxl-refiner``.

What shapes cannot tell is SGM's: both towers read at their penultimate layer, the VAE scale
factor 0.13025, 1024x1024. The prediction type is eps unless the file carries a ``v_pred``
marker tensor (the v-prediction SDXL fine-tunes do) or ``--prediction`` says otherwise.
"""

from __future__ import annotations

import re

from ldm_cli.checkpoints.detect.sd2 import SD2_HEAD_CHANNELS, V_PRED_KEY, infer_openclip_text
from ldm_cli.checkpoints.detect.shapes import UNET, count_indices, infer_unet, infer_vae, require
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import SDXL_BASE, ModelConfig, TextConfig
from ldm_cli.core.errors import UserError

EMBEDDERS = "conditioner.embedders."
SDXL_SIZE = 1024
# SGM's ConcatTimestepEmbedderND: numbers of the ADM vector beside the pooled text embedding
BASE_ADM_NUMBERS = 6  # original size (h, w), crop top-left (top, left), target size (h, w)
REFINER_ADM_NUMBERS = 5  # original size (h, w), crop top-left (top, left), aesthetic score


def detect_sdxl(header: CheckpointHeader) -> ModelConfig:
    name = header.path.name
    if not header.has_prefix(UNET + "input_blocks."):
        raise UserError(f"{name}: SDXL text encoders but no U-Net ({UNET}* tensors)")
    towers = embedder_configs(header)
    unet = infer_unet(header, num_head_channels=SD2_HEAD_CHANNELS)
    width = sum(t.hidden_size for t in towers)
    if unet.context_dim != width:
        raise UserError(
            f"{name}: the U-Net attends to {unet.context_dim}-wide context but the text "
            f"encoders give {width}"
        )
    if unet.adm_in_channels is None:
        raise UserError(f"{name}: an SDXL U-Net without its label_emb (ADM) layers")
    refiner = len(towers) == 1
    numbers = REFINER_ADM_NUMBERS if refiner else BASE_ADM_NUMBERS
    pooled = towers[-1].projection_dim or towers[-1].hidden_size
    extra = unet.adm_in_channels - pooled
    if extra <= 0 or extra % (2 * numbers):
        raise UserError(
            f"{name}: a {unet.adm_in_channels}-wide ADM vector does not hold a {pooled}-wide "
            f"pooled text embedding and {numbers} size embeddings"
        )
    if refiner:
        family = {4: "sdxl-refiner"}.get(unet.in_channels)
    else:
        family = {4: "sdxl", 9: "sdxl-inpaint"}.get(unet.in_channels)
    if family is None:
        raise UserError(
            f"{name}: unknown SDXL U-Net variant with {unet.in_channels} input channels"
        )
    return ModelConfig(
        family=family,
        unet=unet,
        vae=infer_vae(header, scale_factor=SDXL_BASE.vae.scale_factor),
        text=towers[0],
        text2=towers[1] if len(towers) > 1 else None,
        conditioner=True,
        prediction="v" if V_PRED_KEY in header.tensors else "eps",
        default_size=SDXL_SIZE,
    )


def embedder_configs(header: CheckpointHeader) -> list[TextConfig]:
    """The text towers under ``conditioner.embedders.N``, in order."""
    count = count_indices(header, re.escape(EMBEDDERS) + r"(\d+)\.")
    towers = []
    for index in range(count):
        prefix = f"{EMBEDDERS}{index}."
        if header.has_prefix(prefix + "transformer.text_model."):
            towers.append(infer_clip_l(header, prefix + "transformer.text_model."))
        elif header.has_prefix(prefix + "model."):
            towers.append(infer_openclip_text(header, prefix + "model."))
        else:
            raise UserError(f"{header.path.name}: unknown text encoder under {prefix}*")
    if not 1 <= len(towers) <= 2 or towers[-1].kind != "openclip":
        raise UserError(
            f"{header.path.name}: not an SDXL conditioner (expected CLIP ViT-L and OpenCLIP "
            "bigG, or bigG alone)"
        )
    return towers


def infer_clip_l(header: CheckpointHeader, prefix: str) -> TextConfig:
    """A transformers-layout CLIP text tower at `prefix`, read at its penultimate layer."""
    vocab, hidden = require(header, prefix + "embeddings.token_embedding.weight")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=require(header, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=count_indices(header, re.escape(prefix + "encoder.layers.") + r"(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=require(header, prefix + "embeddings.position_embedding.weight")[0],
        clip_skip=2,
    )
