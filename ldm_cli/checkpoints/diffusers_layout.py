"""The original single-file layout <-> a diffusers pipeline folder's parts, tensor by tensor.

Every tensor of ldm's model (``model.diffusion_model.*``, ``first_stage_model.*``, the text
encoders) has one `Entry`: the part folder that holds it in diffusers' layout (``unet``, ``vae``,
``text_encoder``, ``text_encoder_2``) and its name there. The conversion changes no value:

- ``same``: a rename;
- ``split``: OpenCLIP's fused ``in_proj_weight``/``in_proj_bias`` <-> transformers' separate
  ``q_proj``/``k_proj``/``v_proj`` (concatenated in that order);
- ``transpose``: OpenCLIP's ``text_projection`` ([width, projection], used as ``x @ P``) <->
  transformers' ``text_projection.weight`` (a linear layer's [projection, width]);
- ``conv1x1``: the VAE's mid-attention 1x1 convolutions <-> diffusers' linear layers.

A few tensors have no place in a diffusers pipeline: OpenCLIP's ``logit_scale``, and for SD 2.x
the text tower's last block and ``text_projection`` (diffusers' SD 2.x text encoder is one layer
shorter: SD 2.x reads the penultimate layer). Their part is ``EXTRA``: a file of their own in the
folder, under their original names, so that a folder ldm wrote converts back bit for bit.
`stand_in` gives them for a folder diffusers wrote (their values never reach an image).

U-Net names come from checkpoints.diffusers_unet, the VAE's are checked against
detect.vae_file.original_vae_key (the reading direction of the same table).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ldm_cli.checkpoints.detect.vae_file import is_attention_projection, original_vae_key
from ldm_cli.checkpoints.diffusers_unet import diffusers_unet_path
from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError

EXTRA = "extra"
UNET, VAE = "model.diffusion_model.", "first_stage_model."


@dataclass(frozen=True)
class Entry:
    original: str  # the full original key
    part: str  # "unet", "vae", "text_encoder", "text_encoder_2" or EXTRA
    names: tuple[str, ...]  # its name(s) in that part (three for a fused q/k/v projection)
    how: str = "same"  # "same", "split", "transpose" or "conv1x1"


def layout_entries(
    shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, kinds: dict[str, str]
) -> list[Entry]:
    """The entry of each original key of `shapes` (ldm's model of `cfg`); `kinds` are the U-Net's
    block classes (diffusers_unet.block_kinds)."""
    owners = text_owners(cfg)
    entries = []
    for key in shapes:
        if key.startswith(UNET):
            entries.append(_unet_entry(key, cfg.unet.num_res_blocks, kinds))
        elif key.startswith(VAE):
            entries.append(_vae_entry(key, len(cfg.vae.ch_mult)))
        else:
            owner = next((o for o in owners if key.startswith(o.prefix)), None)
            if owner is None:
                raise UserError(f"{key}: no diffusers pipeline part holds this tensor")
            entries.append(owner.entry(key))
    return entries


def _unet_entry(key: str, layers: int, kinds: dict[str, str]) -> Entry:
    module, _, param = key[len(UNET) :].rpartition(".")
    path = diffusers_unet_path(module, layers, kinds)
    if path is None:
        raise UserError(f"{key}: diffusers' UNet2DConditionModel has no such tensor")
    return Entry(key, "unet", (f"{path}.{param}",))


_VAE_PARTS = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v"}
_VAE_ATTENTION["proj_out"] = "to_out.0"


def diffusers_vae_key(key: str, levels: int) -> str:
    """An original (CompVis) AutoencoderKL key -> diffusers' name (unknown keys unchanged)."""
    side, _, rest = key.partition(".")
    if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest):
        kind, level, block, part, what = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        part = _VAE_PARTS.get(part, part)
        return f"{side}.{kind}_blocks.{level}.resnets.{block}.{part}.{what}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(down|up)sample\.conv\.(weight|bias)", rest):
        kind, level, _, what = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        return f"{side}.{kind}_blocks.{level}.{kind}samplers.0.conv.{what}"
    if m := re.fullmatch(r"mid\.block_(\d)\.(\w+)\.(weight|bias)", rest):
        block, part, what = m.groups()
        return f"{side}.mid_block.resnets.{int(block) - 1}.{_VAE_PARTS.get(part, part)}.{what}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        part, what = m.groups()
        return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION.get(part, part)}.{what}"
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest.removeprefix('norm_out.')}"
    return key


def canonical_vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key in today's names (those before diffusers 0.14, ``query``,
    ``proj_attn``..., renamed)."""
    return diffusers_vae_key(original_vae_key(key, levels), levels)


def _vae_entry(key: str, levels: int) -> Entry:
    original = key[len(VAE) :]
    name = diffusers_vae_key(original, levels)
    if original_vae_key(name, levels) != original:  # the two directions of one table
        raise UserError(f"{key}: diffusers' AutoencoderKL has no such tensor")
    return Entry(key, "vae", (name,), "conv1x1" if is_attention_projection(original) else "same")


@dataclass(frozen=True)
class TextOwner:
    """One text encoder of the original file and its diffusers part."""

    prefix: str  # "cond_stage_model.transformer." (transformers' CLIP) or "....model." (OpenCLIP)
    part: str
    openclip: bool
    projection: bool = False  # the part is a CLIPTextModelWithProjection
    dropped_block: int | None = None  # SD 2.x: the last block, which diffusers drops

    def entry(self, key: str) -> Entry:
        rest = key[len(self.prefix) :]
        if not self.openclip:
            return Entry(key, self.part, (rest,))
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest):
            block, inner = int(m.group(1)), m.group(2)
            if block == self.dropped_block:
                return Entry(key, EXTRA, (key,))
            layer = f"text_model.encoder.layers.{block}."
            if m := re.fullmatch(r"attn\.in_proj_(weight|bias)", inner):
                names = tuple(f"{layer}self_attn.{p}_proj.{m.group(1)}" for p in "qkv")
                return Entry(key, self.part, names, "split")
            for original, renamed in _OPENCLIP_BLOCK.items():
                if inner.startswith(original + "."):
                    return Entry(key, self.part, (layer + renamed + inner[len(original) :],))
        if rest == "text_projection":
            if self.projection:
                return Entry(key, self.part, ("text_projection.weight",), "transpose")
            return Entry(key, EXTRA, (key,))
        if rest == "logit_scale":
            return Entry(key, EXTRA, (key,))
        if rest in _OPENCLIP_TOP:
            return Entry(key, self.part, (_OPENCLIP_TOP[rest],))
        raise UserError(f"{key}: transformers' CLIP text model has no such tensor")


_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def text_owners(cfg: ModelConfig) -> list[TextOwner]:
    """The text encoders of `cfg` as the pipeline folder holds them: SD 1.x/2.x's one in
    ``text_encoder``; SDXL's CLIP ViT-L in ``text_encoder``, its OpenCLIP bigG (with the pooled
    projection) in ``text_encoder_2``."""
    if not cfg.conditioner:
        text = cfg.text
        if text.kind == "clip":
            return [TextOwner("cond_stage_model.transformer.", "text_encoder", False)]
        last = text.num_hidden_layers - 1
        return [TextOwner("cond_stage_model.model.", "text_encoder", True, dropped_block=last)]
    owners = []
    for index, text in enumerate(cfg.text_encoders):
        if text.kind == "clip":
            prefix = f"conditioner.embedders.{index}.transformer."
            owners.append(TextOwner(prefix, "text_encoder", False))
        else:
            prefix = f"conditioner.embedders.{index}.model."
            owners.append(TextOwner(prefix, "text_encoder_2", True, projection=True))
    if len({o.part for o in owners}) != len(owners):
        raise UserError("a diffusers SDXL pipeline holds one CLIP and one OpenCLIP text encoder")
    return owners


def to_parts(
    state: dict[str, torch.Tensor], entries: list[Entry], shapes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The original-layout `state` as the tensors of each part (EXTRA included); a UserError
    names a missing or mis-shaped tensor."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for entry in entries:
        tensor = state.get(entry.original)
        if tensor is None:
            raise UserError(f"missing tensor {entry.original}")
        _check_shape(entry.original, tensor, shapes[entry.original])
        tensors = parts.setdefault(entry.part, {})
        if entry.how == "split":
            for name, piece in zip(entry.names, tensor.chunk(3, dim=0), strict=True):
                tensors[name] = piece.clone()  # safetensors refuses tensors sharing memory
        elif entry.how == "transpose":
            tensors[entry.names[0]] = tensor.t().contiguous()
        elif entry.how == "conv1x1":
            tensors[entry.names[0]] = tensor.reshape(tensor.shape[:2]).clone()
        else:
            tensors[entry.names[0]] = tensor
    return parts


def from_parts(
    parts: dict[str, dict[str, torch.Tensor]],
    entries: list[Entry],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """The original-layout state dict of the parts' tensors; a UserError names a missing or
    mis-shaped tensor (by its part and diffusers name)."""
    state = {}
    for entry in entries:
        tensors = parts.get(entry.part, {})
        missing = [n for n in entry.names if n not in tensors]
        if missing:
            raise UserError(f"{entry.part}: missing tensor {missing[0]}")
        found = [tensors[n] for n in entry.names]
        if entry.how == "split":
            for name, piece in zip(entry.names, found, strict=True):
                whole = shapes[entry.original]
                _check_shape(f"{entry.part}/{name}", piece, (whole[0] // 3, *whole[1:]))
            tensor = torch.cat(found, dim=0)
        elif entry.how == "transpose":
            linear_shape = tuple(reversed(shapes[entry.original]))
            _check_shape(f"{entry.part}/{entry.names[0]}", found[0], linear_shape)
            tensor = found[0].t().contiguous()
        elif entry.how == "conv1x1":
            _check_shape(f"{entry.part}/{entry.names[0]}", found[0], shapes[entry.original][:2])
            tensor = found[0].reshape(shapes[entry.original])
        else:
            tensor = found[0]
        where = entry.original if entry.part == EXTRA else f"{entry.part}/{entry.names[0]}"
        _check_shape(where, tensor, shapes[entry.original])
        state[entry.original] = tensor
    return state


def _check_shape(where: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise UserError(f"{where} has shape {list(tensor.shape)}, the model needs {list(expected)}")


def stand_in(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor diffusers' layout has no place for, for a folder that lacks ldm's extra file:
    OpenCLIP's trained ``logit_scale`` (ln 100), an identity ``text_projection``, and for SD 2.x
    a last block of zeros, which passes its input through unchanged (SD 2.x reads the layer
    before it)."""
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)
    if key.endswith("text_projection"):
        return torch.eye(*shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)
