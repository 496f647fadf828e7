"""LoRA layer names -> the parameters of our model, which carry the original checkpoint names.

A LoRA file names every layer it changes in one of these ways (the layer's key without its
``.lora_down.weight``-like suffix is looked up in :func:`layer_table`):

* kohya / AUTOMATIC1111 (``lora_unet_...``, ``lora_te_...``): a module path with every ``.``
  made ``_``. For the U-Net the path is diffusers' (``lora_unet_down_blocks_0_attentions_0_
  transformer_blocks_0_attn1_to_q``: kohya trains SD 1.x/2.x on diffusers' U-Net) or the
  original LDM one (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``: SDXL, and
  files converted from other trainers); both are accepted. Text encoders use transformers'
  ``CLIPTextModel`` paths: ``lora_te_`` for the one encoder of SD 1.x/2.x, ``lora_te1_``
  (CLIP ViT-L) and ``lora_te2_`` (OpenCLIP bigG) for SDXL.
* diffusers / PEFT (``unet.<diffusers path>``, ``text_encoder.<path>``,
  ``text_encoder_2.<path>``), including diffusers' older attention-processor names
  (``attn1.processor.to_q_lora``).

OpenCLIP towers (SD 2.x, SDXL's bigG) keep q, k and v in one fused ``in_proj_weight``; the
transformers names ``self_attn.q_proj``/``k_proj``/``v_proj`` map to its first, second and
third block of rows, ``self_attn.out_proj`` to ``attn.out_proj``, ``mlp.fc1``/``fc2`` to
``mlp.c_fc``/``c_proj``.

The U-Net correspondence (diffusers' ``down_blocks.b.resnets.j`` is the original
``input_blocks.{1 + b * (L + 1) + j}.0`` for L res blocks per level, and so on) is spelled out
in :func:`diffusers_unet_path`; tests/networks/test_lora.py holds it against diffusers' own
checkpoint conversion, tensor by tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ldm_cli.checkpoints.diffusers_unet import block_kinds, diffusers_unet_path
from ldm_cli.networks.lycoris import LOHA_PARTS, LOKR_PARTS

UNET_ROOT = "model.diffusion_model."

# OpenCLIP resblock parts -> transformers CLIPTextModel layer parts (in_proj: see _QKV)
_OPENCLIP_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class LayerTarget:
    """The parameter a LoRA layer changes: a weight of our model (its state_dict name), or a
    block of rows of one (q, k or v of a fused ``in_proj_weight``)."""

    param: str
    component: str  # "unet" or "te": which multiplier of <lora:name:te:unet> applies
    rows: tuple[int, int] | None = None
    # the file's layer holds the two halves of our rows in the other order (diffusers'
    # AdaLayerNormContinuous: (scale, shift) where the original layout has (shift, scale))
    swapped: bool = False


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _tower_prefixes(model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """(our state_dict prefix, tower module, the LoRA name prefixes of that tower)."""
    cfg = model.config
    if cfg.conditioner:
        embedders = model.conditioner.embedders
        if len(embedders) == 1:  # the refiner: bigG alone, diffusers' text_encoder_2
            return [("conditioner.embedders.0.", embedders[0], ("lora_te2_", "text_encoder_2."))]
        names = [("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2.")]
        return [
            (f"conditioner.embedders.{i}.", embedder, names[i])
            for i, embedder in enumerate(embedders)
        ]
    return [("cond_stage_model.", model.cond_stage_model, ("lora_te_", "text_encoder."))]


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def layer_table(model: nn.Module) -> dict[str, LayerTarget]:
    """Every name a LoRA file may give a layer of `model` -> the parameter it changes.

    Names are those of a LoRA key without its suffix: ``lora_unet_..._to_q`` (kohya, from
    diffusers' or the original path), ``unet.down_blocks...to_q`` (diffusers/PEFT),
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ``text_encoder.text_model...``.
    A flow model (FLUX.1, SD3) has its own table: :mod:`ldm_cli.networks.flow_keys`.
    """
    from ldm_cli.models.flow_model import FlowDiffusion

    if isinstance(model, FlowDiffusion):
        from ldm_cli.networks.flow_keys import flow_layer_table

        return flow_layer_table(model)
    table: dict[str, LayerTarget] = {}

    def add(names: list[str], target: LayerTarget) -> None:
        for name in names:
            previous = table.setdefault(name, target)
            if previous != target:
                raise ValueError(f"LoRA name {name} fits both {previous.param} and {target.param}")

    unet = model.model.diffusion_model
    kinds = block_kinds(unet)
    layers = model.config.unet.num_res_blocks
    for path, module in unet.named_modules():
        if not _linear_like(module):
            continue
        target = LayerTarget(UNET_ROOT + path + ".weight", "unet")
        names = ["lora_unet_" + _flat(path)]
        renamed = diffusers_unet_path(path, layers, kinds)
        if renamed is not None:
            names += ["lora_unet_" + _flat(renamed), "unet." + renamed]
        add(names, target)

    for root, tower, (kohya, diffusers) in _tower_prefixes(model):
        if hasattr(tower, "transformer"):  # CLIP: our paths are transformers' own
            base = "transformer."
            for path, module in tower.transformer.named_modules():
                if _linear_like(module):
                    target = LayerTarget(root + base + path + ".weight", "te")
                    add([kohya + _flat(path), diffusers + path], target)
            continue
        blocks = tower.model.transformer.resblocks  # OpenCLIP
        width = tower.model.ln_final.normalized_shape[0]
        for n, _ in enumerate(blocks):
            ours = f"{root}model.transformer.resblocks.{n}."
            layer = f"text_model.encoder.layers.{n}."
            for part, renamed in _OPENCLIP_LAYER.items():
                target = LayerTarget(ours + part + ".weight", "te")
                names = [kohya + _flat(layer + renamed), diffusers + layer + renamed]
                add([*names, kohya + _flat(f"model.transformer.resblocks.{n}.{part}")], target)
            for k, proj in enumerate(_QKV):
                target = LayerTarget(
                    ours + "attn.in_proj_weight", "te", (k * width, (k + 1) * width)
                )
                add(
                    [
                        kohya + _flat(f"{layer}self_attn.{proj}"),
                        f"{diffusers}{layer}self_attn.{proj}",
                    ],
                    target,
                )
            fused = LayerTarget(ours + "attn.in_proj_weight", "te")
            add([kohya + _flat(f"model.transformer.resblocks.{n}.attn.in_proj")], fused)
    return table


# LoRA key suffixes -> (part, what replaces the suffix in the layer name)
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_mid.weight", "mid"),  # LyCORIS LoCon's Tucker middle
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    *((f".{part}", part) for part in (*LOHA_PARTS, *LOKR_PARTS)),
)
# diffusers' attention-processor LoRA: "attn1.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# XLabs' FLUX LoRA: "double_blocks.0.processor.qkv_lora1.down.weight" (the layer name keeps
# its processor part: flow_keys names those layers so)
_XLABS = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")
_OTHER_FORMATS = {
    ".diff": "LyCORIS full weight differences (.diff)",
    ".w_norm": "LyCORIS norm",
    ".b_norm": "LyCORIS norm",
    "oft_": "OFT",
    "lora_magnitude_vector": "PEFT DoRA (lora_magnitude_vector)",
    ".lora_B.bias": "LoRA with biases",
}


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name, part) of a LoRA key, None for a key of another kind. The part is "down",
    "up", "mid", "alpha", "dora_scale" or a LyCORIS LoHa/LoKr name (``hada_w1_a``, ``lokr_w1``,
    ...)."""
    match = _PROCESSOR.match(key)
    if match:
        proj = "to_out.0" if match.group(2) == "to_out" else match.group(2)
        return f"{match.group(1)}.{proj}", match.group(3)
    match = _XLABS.match(key)
    if match:
        return match.group(1), match.group(2)
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)].replace(".processor.", "."), part
    return None


def unsupported_kind(key: str) -> str | None:
    """The name of the format a key belongs to where we do not read it (LyCORIS full
    differences and norms, OFT, ...), None otherwise."""
    for mark, kind in _OTHER_FORMATS.items():
        if mark in key:
            return kind
    return None
