"""diffusers' ``UNet2DConditionModel`` names of the original U-Net's modules (and so of its copy
in a ControlNet): LoRA files and diffusers-format ControlNets name layers this way.

diffusers' ``down_blocks.b.resnets.j`` is the original ``input_blocks.{1 + b * (L + 1) + j}.0``
for L res blocks per level, and so on; tests/networks/test_lora.py holds the correspondence
against diffusers' own checkpoint conversion, tensor by tensor.
"""

from __future__ import annotations

import re

# ResBlock parts: original -> diffusers
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# modules outside the blocks: original -> diffusers
_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$")
_MIDDLE = re.compile(r"middle_block\.(\d+)(?:\.(.+))?$")


def diffusers_unet_path(path: str, layers: int, kinds: dict[str, str]) -> str | None:
    """diffusers' ``UNet2DConditionModel`` path of one of our U-Net module paths (relative to
    ``model.diffusion_model.``), or None where diffusers has no such module.

    `layers` is the number of res blocks per level; `kinds` gives the class name of each
    block part (``"input_blocks.1.1"`` -> ``"SpatialTransformer"``).
    """
    for original, renamed in _UNET_TOP.items():
        if path == original or path.startswith(original + "."):
            return renamed + path[len(original) :]
    match = _BLOCK.match(path)
    if match:
        group, part, inner = match.group(1), match.group(3), match.group(4)
        index = int(match.group(2))
        kind = kinds.get(f"{group}.{index}.{part}")
        inner_path = _inner(kind, inner)
        if inner_path is None:
            return None
        if group == "input_blocks":
            level, j = divmod(index - 1, layers + 1)
            if kind == "Downsample":
                return f"down_blocks.{level}.downsamplers.0.{inner_path}"
            return f"down_blocks.{level}.{_collection(kind)}.{j}.{inner_path}"
        level, j = divmod(index, layers + 1)
        if kind == "Upsample":
            return f"up_blocks.{level}.upsamplers.0.{inner_path}"
        return f"up_blocks.{level}.{_collection(kind)}.{j}.{inner_path}"
    match = _MIDDLE.match(path)
    if match:
        part, inner = int(match.group(1)), match.group(2)
        kind = kinds.get(f"middle_block.{part}")
        inner_path = _inner(kind, inner)
        if inner_path is None:
            return None
        # [ResBlock, SpatialTransformer, ResBlock]: resnets.0, attentions.0, resnets.1
        same_kind_before = sum(kinds.get(f"middle_block.{k}") == kind for k in range(part))
        return f"mid_block.{_collection(kind)}.{same_kind_before}.{inner_path}"
    return None


def _collection(kind: str | None) -> str:
    return "resnets" if kind == "ResBlock" else "attentions"


def _inner(kind: str | None, inner: str | None) -> str | None:
    if inner is None:
        return None
    if kind == "ResBlock":
        for original, renamed in _RESBLOCK.items():
            if inner == original or inner.startswith(original + "."):
                return renamed + inner[len(original) :]
        return None
    if kind == "SpatialTransformer":
        return inner  # the same names in both
    if kind == "Downsample":
        return "conv" + inner[2:] if inner.startswith("op") else None
    if kind == "Upsample":
        return inner
    return None


def block_kinds(unet) -> dict[str, str]:
    """The class name of each block part of a U-Net (or ControlNet) module, as
    `diffusers_unet_path` reads them: ``"input_blocks.1.1"`` -> ``"SpatialTransformer"``."""
    return {
        name: type(module).__name__
        for name, module in unet.named_modules()
        if re.fullmatch(r"(input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+", name)
    }
