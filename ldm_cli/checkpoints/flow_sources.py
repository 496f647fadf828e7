"""A flow model's weights from one file or several, under the names of an all-in-one file.

SD3/3.5 single files hold everything (`model.diffusion_model.*`, `first_stage_model.*`,
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`); FLUX.1 ships the transformer alone in
Black Forest Labs' layout (`double_blocks.*`, no prefix) beside `ae.safetensors`
(`encoder.*`/`decoder.*`), `clip_l.safetensors` (`text_model.*`) and
`t5xxl_fp16.safetensors` (`encoder.*`, `shared.weight`), which `--vae`, `--clip-l`, `--clip-g`
and `--t5` name. `FlowSources` maps every tensor to the all-in-one name by a prefix per part,
so detection and strict loading see one layout whichever files it came from. A part given by
option replaces the main file's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.errors import UserError

TRANSFORMER = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "text_encoders."
# the prefix each part has in an all-in-one file, by option name
PART_PREFIXES = {
    "vae": VAE,
    "clip_l": TEXT + "clip_l.transformer.",
    "clip_g": TEXT + "clip_g.transformer.",
    "t5": TEXT + "t5xxl.transformer.",
}
FLUX_MARK = "double_blocks.0.img_attn.norm.key_norm.scale"
SD3_MARK = "joint_blocks.0.context_block.adaLN_modulation.1.weight"
# transformers' copy of T5's tied embedding; `shared.weight` is the one loaded
T5_TIED_COPY = "encoder.embed_tokens.weight"


@dataclass(frozen=True)
class FlowSources:
    """`header`: the combined view (all-in-one names, the main file's path and metadata);
    `origin`: all-in-one name -> (the file's header, the name in that file)."""

    header: CheckpointHeader
    origin: dict[str, tuple[CheckpointHeader, str]]

    def files(self) -> list[CheckpointHeader]:
        seen: dict[Path, CheckpointHeader] = {}
        for source, _ in self.origin.values():
            seen.setdefault(source.path, source)
        return list(seen.values())


def is_flow_file(header: CheckpointHeader) -> bool:
    """A FLUX or SD3 transformer, alone or in an all-in-one file."""
    return any(
        k in header.tensors for mark in (FLUX_MARK, SD3_MARK) for k in (mark, TRANSFORMER + mark)
    )


def flow_sources(main: CheckpointHeader, parts: dict[str, CheckpointHeader]) -> FlowSources:
    """The combined view of `main` (an all-in-one file or a bare transformer) and the part
    files given by option (keys of PART_PREFIXES)."""
    origin: dict[str, tuple[CheckpointHeader, str]] = {}
    bare = not main.has_prefix(TRANSFORMER)
    for key in main.tensors:
        name = TRANSFORMER + key if bare else key
        if name.endswith(T5_TIED_COPY) and name.startswith(PART_PREFIXES["t5"]):
            continue
        origin[name] = (main, key)
    for part, header in parts.items():
        prefix = PART_PREFIXES[part]
        origin = {k: v for k, v in origin.items() if not k.startswith(prefix)}
        for key in header.tensors:
            name = _part_name(header, part, key)
            if name is not None:
                origin[name] = (header, key)
    tensors = {name: source.tensors[key] for name, (source, key) in origin.items()}
    return FlowSources(CheckpointHeader(main.path, tensors, main.metadata), origin)


def _part_name(header: CheckpointHeader, part: str, key: str) -> str | None:
    """The all-in-one name of `key` in a part file, None for a tensor not loaded (the tied
    T5 embedding copy); a UserError for a file of another layout."""
    prefix = PART_PREFIXES[part]
    if key.startswith(prefix):
        return key
    if part == "vae":
        if key.startswith(VAE):
            return key
        if key.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            return VAE + key
    elif part in ("clip_l", "clip_g"):
        if key.startswith(("text_model.", "text_projection.")):
            return prefix + key
        if key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            return prefix + "text_model." + key  # transformers 5 drops `text_model.`
        if key == "logit_scale":
            return None
    elif key == T5_TIED_COPY:
        return None
    elif key == "shared.weight" or key.startswith("encoder."):
        return prefix + key
    raise UserError(_layout_error(header, part, key))


def _layout_error(header: CheckpointHeader, part: str, key: str) -> str:
    wanted = {
        "vae": "an autoencoder (encoder.*, decoder.*)",
        "clip_l": "a CLIP text model (text_model.*)",
        "clip_g": "a CLIP text model (text_model.*)",
        "t5": "a T5 encoder (encoder.block.*, shared.weight)",
    }[part]
    option = "--" + part.replace("_", "-")
    return f"{option} {header.path.name} is not {wanted}: it holds {key!r}"
