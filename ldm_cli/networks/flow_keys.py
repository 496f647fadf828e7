"""LoRA layer names of the flow models (FLUX.1, SD3/3.5) -> the parameters of our model.

Our transformers keep the original layouts (Black Forest Labs' FLUX, Stability's MMDiT), so a
layer is named in a LoRA file in one of these ways:

* the original module path: kohya/sd-scripts and ComfyUI's ``lora_unet_<path with _>``
  (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_joint_blocks_0_x_block_mlp_fc1``)
  and ComfyUI's generic ``diffusion_model.<path>``;
* diffusers' module path (``FluxTransformer2DModel``, ``SD3Transformer2DModel``): diffusers/PEFT,
  ai-toolkit, SimpleTuner ``transformer.<path>``, OneTrainer ``lora_transformer_<path with _>``,
  SimpleTuner's LyCORIS ``lycoris_<path with _>`` and, for SD3, ``base_model.model.<path>``.
  Where diffusers splits a fused weight (q, k and v of ``img_attn.qkv``, FLUX's single-block
  ``linear1`` = [q, k, v, mlp]) its names map to a block of rows (`LayerTarget.rows`).
  diffusers' ``norm_out.linear`` (both models) and the last SD3 block's
  ``norm1_context.linear`` hold our (shift, scale) halves as (scale, shift): a LoRA of them
  changes our rows with its halves exchanged (`LayerTarget.swapped`), as diffusers' own
  converters swap them;
* XLabs' FLUX LoRAs (``double_blocks.N.processor.qkv_lora1``: the image stream's q, k, v;
  ``qkv_lora2`` the text's, ``proj_lora1``/``proj_lora2`` their output projections;
  ``single_blocks.N.processor.qkv_lora`` the q, k, v rows of ``linear1``, ``proj_lora`` its
  ``linear2``), with or without ``diffusion_model.``.

Text encoders take transformers' paths (``text_model.encoder.layers.0.self_attn.q_proj``,
T5's ``encoder.block.0.layer.0.SelfAttention.q``) after a prefix per encoder: kohya
``lora_te1_`` (CLIP-L), ``lora_te2_`` (SD3's CLIP-G), ``lora_te3_`` (T5; FLUX files from
OneTrainer call it ``lora_te2_``, and diffusers reads FLUX's CLIP-L under ``lora_te_`` too),
diffusers ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.`` (the pipelines' order:
FLUX's ``text_encoder_2`` is T5), and ComfyUI's ``text_encoders.clip_l.transformer.`` (the
keys of our all-in-one files).

tests/networks/test_flow_lora.py holds every diffusers name against diffusers' models built
from the same weights, tensor by tensor, and whole images against diffusers'
``load_lora_weights``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from torch import nn

from ldm_cli.networks.keys import LayerTarget

if TYPE_CHECKING:
    from ldm_cli.models.flow_model import FlowDiffusion

TRANSFORMER_ROOT = "model.diffusion_model."
TEXT_ROOT = "text_encoders."
# names of text-encoder layers in every form above (the rest are the transformer's)
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")

# diffusers' path of a FLUX layer outside the blocks
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# double_blocks.N.<ours> -> transformer_blocks.N.<theirs>
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",  # both chunk (shift, scale, gate) x 2 in the same order
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# single_blocks.N.<ours> -> single_transformer_blocks.N.<theirs>
_FLUX_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_FLUX_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
# XLabs' processor layers: <ours> -> processor.<theirs>; single blocks' qkv_lora: rows of linear1
_XLABS_DOUBLE = {
    "img_attn.qkv": "qkv_lora1",
    "txt_attn.qkv": "qkv_lora2",
    "img_attn.proj": "proj_lora1",
    "txt_attn.proj": "proj_lora2",
}

_MMDIT_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
# joint_blocks.N.<stream>.<ours> -> transformer_blocks.N.<theirs>
_MMDIT_STREAMS = {
    "x_block": {
        "attn.proj": "attn.to_out.0",
        "attn2.proj": "attn2.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
        # (shift, scale, gate) x 2 (x 3 with attn2): SD35AdaLayerNormZeroX's order too
        "adaLN_modulation.1": "norm1.linear",
    },
    "context_block": {
        "attn.proj": "attn.to_add_out",
        "mlp.fc1": "ff_context.net.0.proj",
        "mlp.fc2": "ff_context.net.2",
        "adaLN_modulation.1": "norm1_context.linear",  # but the last block's: see _mmdit_names
    },
}
_MMDIT_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"
_BLOCK = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.(\d+)\.(.+)$")

SWAPPED = "swapped"  # in place of rows: the layer's halves in the other order
Rows = tuple[int, int] | Literal["swapped"] | None


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _row_blocks(names: tuple[str, ...], widths: tuple[int, ...]) -> list[tuple[str, Rows]]:
    """Consecutive blocks of rows, one per name, `widths` rows each."""
    blocks, start = [], 0
    for name, width in zip(names, widths, strict=True):
        blocks.append((name, (start, start + width)))
        start += width
    return blocks


def _flux_names(path: str, hidden: int, mlp: int) -> list[tuple[str, Rows]]:
    """diffusers' names (and rows) of a FLUX layer, [] where it has none we map."""
    if path in _FLUX_TOP:
        return [(_FLUX_TOP[path], None)]
    match = _BLOCK.match(path)
    if match is None:  # final_layer.adaLN_modulation.1
        return [("norm_out.linear", SWAPPED)] if path == _FINAL_MODULATION else []
    kind, n, part = match.groups()
    if kind == "double_blocks":
        block = f"transformer_blocks.{n}."
        if part in _FLUX_DOUBLE_QKV:
            qkv = _row_blocks(_FLUX_DOUBLE_QKV[part], (hidden,) * 3)
            return [(block + name, rows) for name, rows in qkv]
        return [(block + _FLUX_DOUBLE[part], None)] if part in _FLUX_DOUBLE else []
    block = f"single_transformer_blocks.{n}."
    if part == "linear1":
        parts = _row_blocks(_FLUX_LINEAR1, (hidden, hidden, hidden, mlp))
        return [(block + name, rows) for name, rows in parts]
    return [(block + _FLUX_SINGLE[part], None)] if part in _FLUX_SINGLE else []


def _mmdit_names(path: str, hidden: int, last: int) -> list[tuple[str, Rows]]:
    """diffusers' names (and rows) of an MMDiT layer, [] where it has none we map."""
    if path in _MMDIT_TOP:
        return [(_MMDIT_TOP[path], None)]
    match = _BLOCK.match(path)
    if match is None:  # final_layer.adaLN_modulation.1
        return [("norm_out.linear", SWAPPED)] if path == _FINAL_MODULATION else []
    _, n, part = match.groups()
    block = f"transformer_blocks.{n}."
    if part in _MMDIT_QKV:
        qkv = _row_blocks(_MMDIT_QKV[part], (hidden,) * 3)
        return [(block + name, rows) for name, rows in qkv]
    stream, _, rest = part.partition(".")
    if stream == "context_block" and rest == "adaLN_modulation.1" and int(n) == last:
        # the last block's (shift, scale) is AdaLayerNormContinuous's (scale, shift)
        return [(block + "norm1_context.linear", SWAPPED)]
    theirs = _MMDIT_STREAMS.get(stream, {}).get(rest)
    return [(block + theirs, None)] if theirs is not None else []


def _xlabs_names(path: str, hidden: int) -> list[tuple[str, Rows]]:
    """XLabs' names (and rows) of a FLUX layer, [] where it has none."""
    match = _BLOCK.match(path)
    if match is None:
        return []
    kind, n, part = match.groups()
    where = f"{kind}.{n}.processor."
    if kind == "double_blocks":
        return [(where + _XLABS_DOUBLE[part], None)] if part in _XLABS_DOUBLE else []
    if part == "linear1":
        return [(where + "qkv_lora", (0, 3 * hidden))]
    return [(where + "proj_lora", None)] if part == "linear2" else []


def _transformer_names(model: FlowDiffusion) -> Iterator[tuple[list[str], LayerTarget]]:
    transformer = model.model.diffusion_model
    cfg = model.config
    hidden = cfg.transformer.hidden_size
    if cfg.is_flux:
        mlp = int(hidden * cfg.transformer.mlp_ratio)
        prefixes = ("transformer.",)

        def diffusers_names(path: str) -> list[tuple[str, Rows]]:
            return _flux_names(path, hidden, mlp)
    else:
        last = cfg.transformer.depth - 1
        prefixes = ("transformer.", "base_model.model.")

        def diffusers_names(path: str) -> list[tuple[str, Rows]]:
            return _mmdit_names(path, hidden, last)

    for path, module in transformer.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        param = TRANSFORMER_ROOT + path + ".weight"
        yield ["lora_unet_" + _flat(path), "diffusion_model." + path], LayerTarget(param, "unet")
        for name, rows in diffusers_names(path):
            names = [prefix + name for prefix in prefixes]
            names += ["lora_transformer_" + _flat(name), "lycoris_" + _flat(name)]
            swapped = rows == SWAPPED
            yield names, LayerTarget(param, "unet", None if swapped else rows, swapped)
        if cfg.is_flux:
            for name, rows in _xlabs_names(path, hidden):
                yield [name, "diffusion_model." + name], LayerTarget(param, "unet", rows)


def _encoder_prefixes(model: FlowDiffusion) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(our tower, kohya prefixes, diffusers-like prefixes) of each text encoder."""
    if model.config.is_flux:
        return [
            ("clip_l", ("lora_te1_", "lora_te_"), ("text_encoder.",)),
            ("t5xxl", ("lora_te3_", "lora_te2_"), ("text_encoder_2.",)),
        ]
    return [
        ("clip_l", ("lora_te1_",), ("text_encoder.",)),
        ("clip_g", ("lora_te2_",), ("text_encoder_2.",)),
        ("t5xxl", ("lora_te3_",), ("text_encoder_3.",)),
    ]


def _text_names(model: FlowDiffusion) -> Iterator[tuple[list[str], LayerTarget]]:
    encoders = model.text_encoders
    for tower, kohya, diffusers in _encoder_prefixes(model):
        module = getattr(encoders, tower)
        if module is None:  # an SD3 file without T5, or no CLIP-G
            continue
        root = f"{TEXT_ROOT}{tower}.transformer."
        for path, layer in module.transformer.named_modules():
            if not isinstance(layer, nn.Linear):
                continue
            names = [prefix + _flat(path) for prefix in kohya]
            names += [prefix + path for prefix in (*diffusers, root)]
            yield names, LayerTarget(root + path + ".weight", "te")


def flow_layer_table(model: FlowDiffusion) -> dict[str, LayerTarget]:
    """Every name a LoRA file may give a layer of the flow model `model` -> the parameter (or
    block of its rows) it changes: see the module docstring for the forms."""
    table: dict[str, LayerTarget] = {}
    for names, target in (*_transformer_names(model), *_text_names(model)):
        for name in names:
            previous = table.setdefault(name, target)
            if previous != target:
                raise ValueError(f"LoRA name {name} fits both {previous} and {target}")
    return table


def is_text_encoder_name(name: str) -> bool:
    """Whether a layer name of a LoRA file (as `split_key` gives it) is a text encoder's."""
    return name.startswith(TEXT_ENCODER_PREFIXES)
