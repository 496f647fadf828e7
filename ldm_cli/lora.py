"""LoRA: low-rank weight changes from the files people download, applied to the model in place.

Every layer of a LoRA file holds ``down`` [r, in, (kh, kw)], ``up`` [out, r, (1, 1)] and,
optionally, ``alpha``; it changes its weight by ``multiplier * alpha / r * up @ down``
(convolutions: ``up`` flattened to [out, r] times ``down`` flattened to [r, in * kh * kw],
reshaped to the kernel: kohya's LoCon with a 3x3 ``down`` and a 1x1 ``up``). Without an
``alpha`` it is ``r`` (a scale of 1), as in diffusers/PEFT files; a diffusers file's
``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) is read too.
The names of the layers are mapped to ours in :mod:`ldm_cli.lora_keys`.

Which LoRAs apply, as in AUTOMATIC1111:

* ``<lora:NAME:WEIGHT>`` anywhere in a prompt (``<lora:NAME>`` is weight 1;
  ``<lora:NAME:TE:UNET>`` or ``te=``/``unet=`` give the text encoder and the U-Net their own
  weights; ``<lyco:...>`` is the same). The tag is taken out of the prompt before it is
  parsed; NAME is a file name without its extension (``.safetensors``, ``.pt``, ``.ckpt``,
  ``.bin``) searched in the LoRA folder and its subfolders (``--lora-dir``, default
  ``models/Lora`` as in an A1111 install). Tags in the negative prompt are text, as in A1111.
* ``--lora PATH:WEIGHT`` (or ``pipe.networks.loras``): for every prompt.

Layers of a file that match nothing in the model are skipped with a one-line warning that
counts them and names a few (A1111 skips them silently); a file that matches no layer at all
is an error (a LoRA for another model family), and so is one that fits a layer's name but not
its shape. LyCORIS LoHa/LoKr, DoRA and other non-LoRA formats are refused by name.

The touched weights are kept (a copy of each, once) and written back when the set of LoRAs
changes or :meth:`Networks.restore` is called, so the base weights come back bit for bit. A
set stays applied between runs that ask for the same LoRAs (the second pass of hires fix, the
next batch) instead of being patched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .lora_keys import LayerTarget, layer_table, split_key, unsupported_kind
from .pickle_checkpoint import load_weights_only

if TYPE_CHECKING:
    from .embeddings import EmbeddingDatabase
    from .pipeline import Pipeline, Request

DEFAULT_LORA_DIR = Path("models") / "Lora"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
# AUTOMATIC1111's extra-network tag: <type:arg:arg...>
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TYPES = ("lora", "lyco")


# -- prompt tags ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:te:unet>`` of a prompt (or one ``--lora``): name and multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    path: Path | None = None  # given by --lora; tags are looked up in the LoRA folder


def parse_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<...>`` tags, and its LoRA tags in order.

    >>> parse_tags("a cat <lora:ink:0.8>, sketch")
    ('a cat , sketch', [LoraTag(name='ink', te=0.8, unet=0.8, path=None)])
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in _LORA_TYPES:
            raise UserError(
                f"unsupported extra network <{kind}:...> in the prompt; only <lora:NAME:WEIGHT> "
                "is supported"
            )
        tags.append(_tag(args, match.group(0)))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), tags


def strip_tags(prompt: str) -> str:
    return parse_tags(prompt)[0]


def _tag(args: str, text: str) -> LoraTag:
    positional, named = [], {}
    for arg in args.split(":"):
        key, sep, value = arg.partition("=")
        if sep and key.strip() in ("te", "unet", "dyn"):
            named[key.strip()] = value
        else:
            positional.append(arg)
    name = positional[0].strip() if positional else ""
    if not name:
        raise UserError(f"{text} in the prompt names no LoRA")
    te = _number(positional[1], text) if len(positional) > 1 else 1.0
    te = _number(named["te"], text) if "te" in named else te
    unet = _number(positional[2], text) if len(positional) > 2 else te
    unet = _number(named["unet"], text) if "unet" in named else unet
    return LoraTag(name, te, unet)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"LoRA weight {text.strip()!r} in {where} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"LoRA weight {text.strip()!r} in {where} is not a finite number")
    return value


def parse_lora_option(text: str) -> LoraTag:
    """``--lora PATH[:WEIGHT]``: a file (or a name in the LoRA folder) and its weight."""
    path, sep, weight = text.rpartition(":")
    if sep and path and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", weight):
        value = _number(weight, f"--lora {text}")
    else:
        path, value = text, 1.0
    return LoraTag(Path(path).stem if _is_file_like(path) else path, value, value, Path(path))


def _is_file_like(text: str) -> bool:
    return os.sep in text or "/" in text or text.lower().endswith(LORA_EXTENSIONS)


# -- files ------------------------------------------------------------------------------------


@dataclass
class LoraLayer:
    target: LayerTarget
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)

    def delta(self, target_shape: torch.Size, name: str, device=None) -> torch.Tensor:
        """up @ down * scale in float32 on `device`, shaped like the weight it changes."""
        out_dim, rank = self.up.shape[0], self.up.shape[1]
        if self.up[0, 0].numel() != 1 or self.down.shape[0] != rank:
            raise UserError(
                f"LoRA {name}: layer {self.target.param} has a down {tuple(self.down.shape)} "
                f"and up {tuple(self.up.shape)} that do not make a LoRA"
            )
        up = self.up.reshape(out_dim, rank).to(device, torch.float32)
        down = self.down.reshape(rank, -1).to(device, torch.float32)
        delta = (up @ down) * self.scale
        rows = self.target.rows
        shape = list(target_shape)
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        if delta.shape[0] != shape[0] or delta.numel() != torch.Size(shape).numel():
            raise UserError(
                f"LoRA {name} does not fit this model: layer {self.target.param} is "
                f"{'x'.join(map(str, shape))} here, the LoRA changes "
                f"{'x'.join(map(str, (out_dim, *self.down.shape[1:])))} (a LoRA for another "
                "model family?)"
            )
        return delta.reshape(shape)


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
    try:
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as file:
                metadata = file.metadata() or {}
                return {key: file.get_tensor(key) for key in file.keys()}, metadata  # noqa: SIM118
        state = load_weights_only(path)  # refused without --allow-pickle
    except UserError:
        raise
    except OSError as error:
        raise UserError(f"cannot read LoRA {path}: {error.strerror or error}") from None
    except Exception as error:  # a damaged or unsafe file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read LoRA {path}: {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"LoRA {path} holds no tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def read_lora(path: Path, table: dict[str, LayerTarget]) -> LoraFile:
    """A LoRA file's layers, mapped to our parameters with `table` (lora_keys.layer_table)."""
    state, metadata = read_state(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        kind = unsupported_kind(key)
        split = split_key(key)
        if kind is not None or split is None:
            raise UserError(
                f"LoRA {path.name} holds {kind or 'unknown'} layers ({key}); only LoRA "
                "(lora_up/lora_down, lora_A/lora_B) files are supported"
            )
        name, part = split
        parts.setdefault(name, {})[part] = tensor
    peft = _peft_alphas(metadata)
    layers, unmatched = [], []
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise UserError(f"LoRA {path.name}: layer {name} has no {missing} weight")
        target = table.get(name)
        if target is None:
            unmatched.append(name)
            continue
        rank = found["down"].shape[0]
        alpha = float(found["alpha"]) if "alpha" in found else peft.alpha(name, rank)
        scale = alpha / (rank**0.5 if peft.rslora else rank)
        layers.append(LoraLayer(target, found["down"], found["up"], scale))
    if not layers:
        some = ", ".join(sorted(unmatched)[:3])
        raise UserError(
            f"LoRA {path.name} matches no layer of this model (a LoRA for another model "
            f"family?); its layers are named like {some}"
        )
    return LoraFile(path, layers, unmatched, metadata)


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
    """The LoRA file called `name` (no extension) in `directory` or below it."""
    if directory.is_dir():
        for extension in LORA_EXTENSIONS:
            direct = directory / f"{name}{extension}"
            if direct.is_file():
                return direct
        for root, _, files in sorted(os.walk(directory, followlinks=True)):
            for file in sorted(files):
                stem, extension = os.path.splitext(file)
                if stem == name and extension.lower() in LORA_EXTENSIONS:
                    return Path(root) / file
    raise UserError(
        f"LoRA {name!r} not found in {directory} (give the folder with --lora-dir, or the file "
        "with --lora PATH:WEIGHT)"
    )


# -- applying ---------------------------------------------------------------------------------


def lora_deltas(
    model: torch.nn.Module, loras: Sequence[tuple[LoraFile, float, float]]
) -> dict[str, torch.Tensor]:
    """The summed change of every touched parameter (float32, on the parameter's device) for
    LoRAs with their (text encoder, U-Net) multipliers."""
    params = dict(model.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    for lora, te, unet in loras:
        multiplier = {"te": te, "unet": unet}
        for layer in lora.layers:
            weight = multiplier[layer.target.component]
            if weight == 0:
                continue
            name = layer.target.param
            param = params[name]
            delta = layer.delta(param.shape, lora.path.name, param.device) * weight
            total = deltas.get(name)
            if total is None:
                total = deltas[name] = torch.zeros(param.shape, device=param.device)
            rows = layer.target.rows
            if rows is None:
                total += delta
            else:
                total[rows[0] : rows[1]] += delta
    return deltas


class Networks:
    """A pipeline's LoRAs and textual-inversion embeddings (``pipe.networks``).

    `lora_dir` is where ``<lora:NAME>`` is looked up, `loras` the ``--lora`` files applied to
    every prompt, `embeddings` the textual-inversion database (``load_embeddings``).
    """

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.lora_dir = DEFAULT_LORA_DIR
        self.loras: list[LoraTag] = []
        self.embeddings: EmbeddingDatabase | None = None
        self._table: dict[str, LayerTarget] | None = None
        self._files: dict[tuple, LoraFile] = {}  # the files read for the current set
        self._hashes: dict[tuple, str] = {}
        self._applied: tuple = ()
        self._backup: dict[str, torch.Tensor] = {}
        self._paths: dict[str, Path] = {}

    # -- configuration

    def add_lora(self, spec: str | os.PathLike, weight: float | None = None) -> None:
        """A LoRA for every prompt: ``"PATH:WEIGHT"``, or a path (or name) and `weight`."""
        if weight is None:
            tag = parse_lora_option(os.fspath(spec))
        else:
            path = Path(spec)
            tag = LoraTag(path.stem, float(weight), float(weight), path)
        self.loras.append(tag)

    def load_embeddings(self, directory: str | os.PathLike) -> EmbeddingDatabase:
        from .embeddings import EmbeddingDatabase

        self.embeddings = EmbeddingDatabase.from_directory(
            Path(directory), self.pipe.model.text_encoder, self.pipe.tokenizer
        )
        for name, reason in self.embeddings.skipped.items():
            print(f"warning: embedding {name} skipped: {reason}", file=sys.stderr)
        return self.embeddings

    # -- which LoRAs a prompt asks for

    def wanted(self, prompt: str) -> list[tuple[LoraTag, Path]]:
        """The prompt's ``<lora:...>`` tags, then the ``--lora`` ones, with their files."""
        _, tags = parse_tags(prompt)
        return [(tag, self.path_of(tag)) for tag in [*tags, *self.loras]]

    def path_of(self, tag: LoraTag) -> Path:
        """The file of a tag: its --lora path, or its name looked up in `lora_dir`."""
        if tag.path is not None and (tag.path.is_file() or _is_file_like(str(tag.path))):
            if not tag.path.is_file():
                raise UserError(f"LoRA file {tag.path} not found")
            return tag.path
        key = str(self.lora_dir) + "\0" + tag.name
        if key not in self._paths:
            self._paths[key] = find_lora(tag.name, Path(self.lora_dir))
        return self._paths[key]

    def file(self, path: Path) -> LoraFile:
        key = _file_key(path)
        if key not in self._files:
            if self._table is None:
                self._table = layer_table(self.pipe.model)
            lora = read_lora(path, self._table)
            if lora.unmatched:
                some = ", ".join(sorted(lora.unmatched)[:3])
                count, total = len(lora.unmatched), len(lora.unmatched) + len(lora.layers)
                print(
                    f"warning: LoRA {path.name}: {count} of {total} layers match nothing in "
                    f"this model and are skipped (e.g. {some})",
                    file=sys.stderr,
                )
            self._files[key] = lora
        return self._files[key]

    # -- applying

    def activate(self, requests: Sequence[Request]) -> list[Request]:
        """Apply the LoRAs that the batch's prompts ask for (restoring the weights first when
        the set changes) and return the requests with the tags taken out of the prompts."""
        wanted = [self.wanted(r.prompt) for r in requests]
        if any(w != wanted[0] for w in wanted[1:]):
            raise UserError(
                "the prompts of one batch ask for different LoRAs; render them in separate "
                "batches (--batch-size 1)"
            )
        self.apply([(path, tag.te, tag.unet) for tag, path in wanted[0]])
        return [replace(r, prompt=strip_tags(r.prompt)) for r in requests]

    def apply(self, loras: Sequence[tuple[Path, float, float]]) -> None:
        """Make the model its base weights plus exactly these LoRAs ((file, te, unet) each)."""
        files = [(self.file(Path(path)), te, unet) for path, te, unet in loras]
        key = tuple((f.path.resolve(), id(f), te, unet) for f, te, unet in files)
        # keep only these files' tensors in memory
        wanted = {id(f) for f, _, _ in files}
        self._files = {k: f for k, f in self._files.items() if id(f) in wanted}
        if key == self._applied:
            return
        self.restore()
        if not files:
            return
        with torch.no_grad():
            deltas = lora_deltas(self.pipe.model, files)
            params = dict(self.pipe.model.named_parameters())
            if any(params[name].is_meta for name in deltas):  # held by accelerate's hooks
                raise UserError("LoRAs cannot be applied with --offload sequential; use model")
            compute = getattr(self.pipe, "dtype", None)
            for name, delta in deltas.items():
                param = params[name]
                if compute is not None and param.dtype != compute and param.device.type == "cpu":
                    # kept in the file's fp16 (narrow_weights): patched in the compute dtype
                    param.data = param.data.to(compute)
                with _writable(param), torch.no_grad():
                    self._backup[name] = param.detach().clone()
                    param.copy_((param.float() + delta).to(param.dtype))
        self._applied = key

    def restore(self) -> None:
        """Write back the base weights that LoRAs changed (bit-exact)."""
        if self._backup:
            params = dict(self.pipe.model.named_parameters())
            with torch.no_grad():
                for name, original in self._backup.items():
                    with _writable(params[name]), torch.no_grad():
                        params[name].copy_(original)
        self._backup = {}
        self._applied = ()

    # -- metadata

    def parameters(self, req: Request) -> dict[str, str]:
        """A1111's ``Lora hashes`` and ``TI hashes`` entries for a request (empty if none)."""
        extra = {}
        hashes = {}
        for tag, path in self.wanted(req.prompt):
            key = _file_key(path)
            if key not in self._hashes:
                self._hashes[key] = lora_hash(path)
            hashes[_infotext_name(tag.name)] = self._hashes[key]
        if hashes:
            extra["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
        if self.embeddings is not None:
            used = self.embeddings.used_in(
                [req.negative_prompt, strip_tags(req.prompt)], req.steps, split=[False, True]
            )
            if used:
                extra["TI hashes"] = ", ".join(f"{_infotext_name(e.name)}: {e.hash}" for e in used)
        return extra


def _file_key(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError as error:
        raise UserError(f"cannot read LoRA {path}: {error.strerror or error}") from None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _writable(param: torch.Tensor):
    """Where a parameter can be written in place: inside inference mode if it was made there
    (an inference tensor), outside it otherwise."""
    return torch.inference_mode(param.is_inference())


def _infotext_name(name: str) -> str:
    """A1111 drops ':' and ',' from names in these lists."""
    return name.replace(":", "").replace(",", "")
