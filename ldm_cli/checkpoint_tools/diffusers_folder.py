"""A diffusers StableDiffusion(XL)Pipeline folder <-> the original single-file state dict.

`read_diffusers_folder` gives the tensors of a pipeline folder (model_index.json, unet/, vae/,
text_encoder/, text_encoder_2/ for SDXL; safetensors weights, fp16 variants and sharded ones
too; ``.bin`` pickles only with --allow-pickle, read weights-only) under the original names and
shapes of ldm's model, with its ModelConfig; `write_diffusers_folder` writes the folder that
``StableDiffusionPipeline.from_pretrained`` (``StableDiffusionXLPipeline``) loads offline:
configurations, scheduler, tokenizers, weights. Tensors keep their dtype and bytes: the key
tables (checkpoints.diffusers_layout) rename, split or join q/k/v, transpose and reshape, and
change no value. The few tensors diffusers has no place for go into ``EXTRA_FILE``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch

from ldm_cli.checkpoints.diffusers_layout import (
    EXTRA,
    canonical_vae_key,
    from_parts,
    layout_entries,
    stand_in,
    to_parts,
)
from ldm_cli.checkpoints.diffusers_layout_config_read import listed, model_config
from ldm_cli.checkpoints.diffusers_layout_configs import PIPELINES, folder_configs
from ldm_cli.checkpoints.diffusers_unet import block_kinds
from ldm_cli.checkpoints.header import KNOWN_EXTRAS
from ldm_cli.checkpoints.pickled import load_weights_only
from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError
from ldm_cli.models.loading import build_empty

# ldm's own file of the tensors diffusers' layout drops (original names; see diffusers_layout)
EXTRA_FILE = "ldm_original_extras.safetensors"
_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def write_diffusers_folder(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> Path:
    """Write `state` (original layout, a model of `cfg`) as a diffusers pipeline folder `out`,
    atomically (a temporary folder beside it, then renamed); an existing non-empty `out` is
    refused. Training leftovers (schedule buffers, EMA bookkeeping) are not written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new folder name")
    if cfg.family not in PIPELINES:
        raise UserError(f"a {cfg.family} model has no diffusers StableDiffusion pipeline folder")
    shapes, entries = _layout(cfg)
    unexpected = sorted(k for k in state if k not in shapes and not KNOWN_EXTRAS.match(k))
    if unexpected:
        raise UserError(f"unexpected tensor {unexpected[0]} for a {cfg.family} model")
    parts = to_parts(state, entries, shapes)
    text_dtype = next(iter((parts.get("text_encoder") or parts["text_encoder_2"]).values())).dtype
    configs = folder_configs(cfg, _DTYPE_NAMES.get(text_dtype, "float32"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        for name, config in configs.items():
            path = tmp / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for part, tensors in parts.items():
            path = tmp / EXTRA_FILE if part == EXTRA else tmp / part / _weights_name(part)
            _save(tensors, path)
        for name in configs:
            if name.endswith("/tokenizer_config.json"):
                _write_vocabulary(tmp / Path(name).parent)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_diffusers_folder(folder: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The original-layout state dict and ModelConfig of a diffusers SD 1.x/2.x/XL pipeline
    folder; a one-line UserError names what is missing, unknown or mis-shaped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    configs = {"model_index.json": _read_json(folder, "model_index.json")}
    index = configs["model_index.json"]
    for name in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        configs[name] = _read_json(folder, name)
    for part, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if listed(index, part):
            configs[f"{part}/config.json"] = _read_json(folder, f"{part}/config.json")
        if listed(index, tokenizer) and (folder / tokenizer / "tokenizer_config.json").is_file():
            name = f"{tokenizer}/tokenizer_config.json"
            configs[name] = _read_json(folder, name)
    extras = _load_safetensors(folder / EXTRA_FILE) if (folder / EXTRA_FILE).is_file() else {}
    # SD 2.x's projection width, which diffusers' configuration does not keep (a wrong shape
    # is named by from_parts)
    widths = (v.shape[-1] for k, v in extras.items() if k.endswith("text_projection") and v.ndim)
    projection = next(widths, None)
    cfg = model_config(configs, projection)
    shapes, entries = _layout(cfg)
    parts = {}
    for part in sorted({e.part for e in entries} - {EXTRA}):
        parts[part] = _canonical(part, _read_part(folder, part), len(cfg.vae.ch_mult))
    parts[EXTRA] = dict(extras)
    dtype = next(iter((parts.get("text_encoder_2") or parts["text_encoder"]).values())).dtype
    for entry in entries:  # a folder diffusers wrote has none of them
        if entry.part == EXTRA and entry.original not in extras:
            parts[EXTRA][entry.original] = stand_in(entry.original, shapes[entry.original], dtype)
    used: dict[str, set[str]] = {}
    for entry in entries:
        used.setdefault(entry.part, set()).update(entry.names)
    for part, tensors in parts.items():
        unknown = sorted(set(tensors) - used.get(part, set()))
        if unknown:
            where = EXTRA_FILE if part == EXTRA else part
            raise UserError(f"{where}: unexpected tensor {unknown[0]} for a {cfg.family} model")
    return from_parts(parts, entries, shapes), cfg


def _layout(cfg: ModelConfig):
    """ldm's model of `cfg`: its tensors' shapes and their diffusers entries."""
    try:
        model = build_empty(cfg)
    except ValueError as error:  # widths no real model has (GroupNorm groups ...)
        raise UserError(f"not a buildable {cfg.family} model: {error}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, layout_entries(shapes, cfg, block_kinds(model.model.diffusion_model))


def _read_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder.name}: missing {name}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{folder.name}/{name} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{folder.name}/{name} is not a JSON object")
    return value


def _weights_name(part: str) -> str:
    return f"{_STEMS[part][0]}.safetensors"


def _read_part(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A part's tensors: its safetensors file (the full-precision one first, then the fp16
    variant), sharded or not, else its pickle (--allow-pickle)."""
    stem, pickle_stem = _STEMS[part]
    where = folder / part
    for variant in ("", ".fp16"):
        if (where / f"{stem}{variant}.safetensors").is_file():
            return _load_safetensors(where / f"{stem}{variant}.safetensors")
        # diffusers names a variant's index ...safetensors.index.fp16.json
        index_names = (f"{stem}{variant}.safetensors.index.json",
                       f"{stem}.safetensors.index{variant}.json")  # fmt: skip
        shards = next((where / n for n in index_names if (where / n).is_file()), None)
        if shards is not None:
            weight_map = _read_json(where, shards.name).get("weight_map", {})
            tensors = {}
            for name in sorted(set(weight_map.values())):
                tensors.update(_load_safetensors(where / name))
            return tensors
    for variant in ("", ".fp16"):
        path = where / f"{pickle_stem}{variant}.bin"
        if path.is_file():
            loaded = load_weights_only(path)  # refused without --allow-pickle
            if not isinstance(loaded, dict):
                raise UserError(f"{part}/{path.name} does not hold a state dict")
            return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    raise UserError(f"{folder.name}: missing {part}/{stem}.safetensors (the {part}'s weights)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"missing {path.parent.name}/{path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path.parent.name}/{path.name} is not a readable safetensors file "
                        f"({error})") from None  # fmt: skip


def _canonical(part: str, tensors: dict[str, torch.Tensor], vae_levels: int) -> dict:
    """Today's names of a part's tensors (older diffusers/transformers names renamed)."""
    if part == "vae":
        return {canonical_vae_key(k, vae_levels): v for k, v in tensors.items()}
    if part.startswith("text_encoder"):
        out = {}
        for k, v in tensors.items():
            if k.endswith("position_ids"):  # a buffer older transformers saved
                continue
            out[k if k.startswith("text_model.") or k == "text_projection.weight"
                else f"text_model.{k}"] = v  # fmt: skip
        return out
    return tensors


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(exist_ok=True)
    # transformers reads only files marked "pt"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {"format": "pt"})


def _write_vocabulary(folder: Path) -> None:
    vocab, merges = _vocabulary_texts()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


@functools.cache
def _vocabulary_texts() -> tuple[str, str]:
    """CLIP's vocab.json and merges.txt, from the BPE table open_clip ships (text.tokenizer)."""
    from ldm_cli.text.tokenizer import load_vocab_and_merges

    vocab, merges = load_vocab_and_merges()
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    return json.dumps(vocab, ensure_ascii=False), "\n".join(lines) + "\n"
