"""LoRA files: their layers read and mapped to our parameters, their hashes, and where a
named LoRA lies (see :mod:`ldm_cli.networks.lora` for the formats)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_cli.checkpoints.small_files import read_tensors
from ldm_cli.core.errors import UserError
from ldm_cli.core.run_folders import model_files
from ldm_cli.networks.keys import LayerTarget, split_key, unsupported_kind
from ldm_cli.networks.lycoris import LOHA_PARTS, LOKR_PARTS, Change, LowRank, decomposed, loha, lokr
from ldm_cli.networks.tags import LORA_EXTENSIONS


@dataclass(frozen=True)
class LoraLayer:
    target: LayerTarget
    change: Change  # LoRA/LoCon, LoHa or LoKr, its scale (alpha / rank) included
    magnitude: torch.Tensor | None = None  # DoRA's dora_scale

    def delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """The change of `weight` (the rows of the parameter that this layer changes; only
        DoRA reads its values) in float32 on its device, shaped like it; `name`: the file's."""
        updown = self.change.updown(weight.device)
        shape = weight.shape
        if updown.shape[0] != shape[0] or updown.numel() != shape.numel():
            raise UserError(
                f"LoRA {name} does not fit this model: layer {self.target.param} is "
                f"{'x'.join(map(str, shape))} here, the LoRA changes "
                f"{'x'.join(map(str, updown.shape))} (a LoRA for another model family?)"
            )
        updown = updown.reshape(shape)
        if self.magnitude is None:
            return updown
        where = f"LoRA {name}: layer {self.target.param}"
        return decomposed(weight, updown, self.magnitude, where)


@dataclass
class LoraFile:
    path: Path
    layers: list[LoraLayer]
    unmatched: list[str]  # layer names of the file that match nothing in the model
    metadata: dict[str, str] = field(default_factory=dict)


def lora_hash(path: Path) -> str:
    """A1111's short hash of a LoRA: the first 12 hex digits of the file's
    ``sshs_model_hash``, or of the sha256 of its tensor data (kohya's "addnet" hash: the file
    after its header) for .safetensors, or of the whole file otherwise."""
    if _is_safetensors(path):
        stored = _safetensors_metadata(path).get("sshs_model_hash", "")
        if re.fullmatch(r"[0-9a-fA-F]{12,64}", stored):
            return stored[:12].lower()
    return file_sha256(path, skip_header=_is_safetensors(path))[:12]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def file_sha256(path: Path, skip_header: bool = False) -> str:
    """sha256 of a file; `skip_header`: of what follows a safetensors header (addnet hash)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            if skip_header:
                (length,) = struct.unpack("<Q", file.read(8))
                file.seek(8 + length)
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    return digest.hexdigest()


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a LoRA file; pickles load with weights_only."""
    return read_tensors(path, "LoRA")


def read_lora(path: Path, table: dict[str, LayerTarget]) -> LoraFile:
    """A LoRA file's layers, mapped to our parameters with `table` (lora_keys.layer_table)."""
    state, metadata = read_state(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        kind = unsupported_kind(key)
        split = split_key(key)
        if kind is not None or split is None:
            raise UserError(
                f"LoRA {path.name} holds {kind or 'unknown'} layers ({key}); only LoRA/LoCon "
                "(lora_up/lora_down, lora_A/lora_B), LyCORIS LoHa/LoKr and DoRA files are "
                "supported"
            )
        name, part = split
        parts.setdefault(name, {})[part] = tensor
    peft = _peft_alphas(metadata)
    layers, unmatched = [], []
    for name, found in parts.items():
        change = _change(found, f"LoRA {path.name}: layer {name}", name, peft)
        target = table.get(name)
        if target is None:
            unmatched.append(name)
            continue
        layers.append(LoraLayer(target, change, found.get("dora_scale")))
    if not layers:
        some = ", ".join(sorted(unmatched)[:3])
        raise UserError(
            f"LoRA {path.name} matches no layer of this model (a LoRA for another model "
            f"family?); its layers are named like {some}"
        )
    return LoraFile(path, layers, unmatched, metadata)


def _change(found: dict[str, torch.Tensor], where: str, name: str, peft: _PeftAlphas) -> Change:
    """The weight change of one layer's parts: LoHa, LoKr or LoRA (LoCon, Tucker middle)."""
    kinds = [
        kind
        for kind, marks in (("LoHa", LOHA_PARTS), ("LoKr", LOKR_PARTS), ("LoRA", ("down", "up")))
        if any(mark in found for mark in marks)
    ]
    if len(kinds) > 1:
        raise UserError(f"{where} mixes {' and '.join(kinds)} weights")
    if kinds == ["LoHa"]:
        return loha(found, where)
    if kinds == ["LoKr"]:
        return lokr(found, where)
    if "down" not in found or "up" not in found:
        raise UserError(f"{where} has no {'up' if 'down' in found else 'down'} weight")
    rank = found["down"].shape[0]
    alpha = float(found["alpha"]) if "alpha" in found else peft.alpha(name, rank)
    scale = alpha / (rank**0.5 if peft.rslora else rank)
    change = LowRank(found["up"], found["down"], found.get("mid"), scale)
    change.check(where)
    return change


@dataclass
class _PeftAlphas:
    """diffusers' ``lora_adapter_metadata`` ({"unet.lora_alpha": .., "unet.alpha_pattern": ..})."""

    config: dict[str, dict]
    rslora: bool = False

    def alpha(self, name: str, rank: int) -> float:
        component, _, module = name.partition(".")
        config = self.config.get(component, {})
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(value)
        value = config.get("lora_alpha")
        return float(value) if value is not None else float(rank)


def _peft_alphas(metadata: dict[str, str]) -> _PeftAlphas:
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return _PeftAlphas({})
    try:
        flat = json.loads(text)
    except ValueError:
        return _PeftAlphas({})
    config: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, option = key.partition(".")
        config.setdefault(component, {})[option] = value
    rslora = any(c.get("use_rslora") for c in config.values())
    return _PeftAlphas(config, rslora)


def find_lora(name: str, directory: Path) -> Path:
    """The LoRA file called `name` (no extension) in `directory` or below it; a name that
    leads out of it (`../x`, an absolute path) is refused: a prompts file or a request names
    files in the folder, not anywhere."""
    # lexically, not by resolving: LoRA folders often hold links to files kept elsewhere
    if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise UserError(f"<lora:{name}:...> names a file outside {directory}; give its name there")
    if directory.is_dir():
        for extension in LORA_EXTENSIONS:
            direct = directory / f"{name}{extension}"
            if direct.is_file():
                return direct
        for root, files in model_files(directory):
            for file in files:
                stem, extension = os.path.splitext(file)
                if stem == name and extension.lower() in LORA_EXTENSIONS:
                    return root / file
    raise UserError(
        f"LoRA {name!r} not found in {directory} (give the folder with --lora-dir, or the file "
        "with --lora PATH:WEIGHT)"
    )
