"""Which separate VAE file a checkpoint is (``--vae FILE``), and its tensors' original names.

Three kinds, told apart by tensor names alone:

- ``original``: CompVis' ``encoder.down.0.block.0...``/``decoder.up...``, ``quant_conv``
  (``vae-ft-mse-840000-ema-pruned``, the SDXL VAE and its fp16 fix as A1111 uses them, FLUX's
  ``ae.safetensors``), bare or under ``first_stage_model.`` or ``vae.``;
- ``diffusers``: AutoencoderKL's ``encoder.down_blocks.0.resnets.0...``
  (``diffusion_pytorch_model.safetensors`` of a ``vae`` folder), renamed to the original names
  by ``original_vae_key`` (diffusers' attention projections are linear layers: their weights
  get the 1x1 convolution shape);
- ``taesd``: a tiny autoencoder (checkpoints.detect.taesd).

A pickled VAE's training leftovers (``loss.*``, ``model_ema.decay``/``num_updates``) are
ignored, as A1111 ignores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ldm_cli.checkpoints.header import CheckpointHeader

PREFIXES = ("", "first_stage_model.", "vae.")
IGNORED = ("loss.", "model_ema.decay", "model_ema.num_updates")
_ORIGINAL_MARK = "decoder.up.0.block.0.conv1.weight"
_DIFFUSERS_MARK = "decoder.up_blocks.0.resnets.0.conv1.weight"


@dataclass(frozen=True)
class VAEFileLayout:
    kind: str  # "original", "diffusers" or "taesd"
    prefix: str = ""
    up_levels: int = 0  # diffusers: decoder.up_blocks.N counts from the top level down

    def original_key(self, key: str) -> str | None:
        """The original (CompVis) name of a file key (one under the prefix); None for keys to
        ignore."""
        key = key[len(self.prefix) :]
        if key.startswith(IGNORED):
            return None
        return original_vae_key(key, self.up_levels) if self.kind == "diffusers" else key


def vae_file_layout(header: CheckpointHeader) -> VAEFileLayout | None:
    """The kind of VAE file `header` is, or None."""
    from ldm_cli.checkpoints.detect.taesd import taesd_layout

    names = header.tensors.keys()
    for prefix in PREFIXES:
        if prefix + _ORIGINAL_MARK in names:
            return VAEFileLayout("original", prefix)
        if prefix + _DIFFUSERS_MARK in names:
            pattern = re.compile(re.escape(prefix) + r"decoder\.up_blocks\.(\d+)\.")
            levels = {int(m.group(1)) for k in names if (m := pattern.match(k))}
            return VAEFileLayout("diffusers", prefix, up_levels=max(levels) + 1)
    if taesd_layout(header) is not None:
        return VAEFileLayout("taesd")
    return None


_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # diffusers' names before 0.14
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}


def original_vae_key(key: str, up_levels: int) -> str:
    """diffusers' AutoencoderKL name -> the original one (unknown names come back unchanged,
    so that the strict load names them)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", rest):
        kind, level, block, part, what = m.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{side}.{kind}.{level}.block.{block}.{_RESNET_PARTS.get(part, part)}.{what}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)$", rest):
        kind, level, _, what = m.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{side}.{kind}.{level}.{kind}sample.conv.{what}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)$", rest):
        block, part, what = m.groups()
        return f"{side}.mid.block_{int(block) + 1}.{_RESNET_PARTS.get(part, part)}.{what}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest):
        part, what = m.groups()
        return f"{side}.mid.attn_1.{_ATTENTION.get(part, part)}.{what}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    return key  # conv_in, conv_out


def is_attention_projection(original_key: str) -> bool:
    """A 1x1-convolution weight of the mid attention, stored by diffusers as a linear one."""
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))
