"""LoRA: low-rank weight changes from the files people download, applied to the model in place.

Every layer of a LoRA file holds ``down`` [r, in, (kh, kw)], ``up`` [out, r, (1, 1)] and,
optionally, ``alpha``; it changes its weight by ``multiplier * alpha / r * up @ down``
(convolutions: ``up`` flattened to [out, r] times ``down`` flattened to [r, in * kh * kw],
reshaped to the kernel: kohya's LoCon with a 3x3 ``down`` and a 1x1 ``up``). Without an
``alpha`` it is ``r`` (a scale of 1), as in diffusers/PEFT files; a diffusers file's
``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) is read too.
LyCORIS layers (LoCon with a Tucker ``lora_mid``, LoHa, LoKr) and DoRA's ``dora_scale`` are
read as A1111 reads them (:mod:`ldm_cli.networks.lycoris`); a DoRA layer's change is
``multiplier * (dora_scale * (W + d) / ||W + d|| - W)`` for its scaled change d.
The names of the layers are mapped to ours in :mod:`ldm_cli.networks.keys`, files are read in
:mod:`ldm_cli.networks.files` and prompt tags parsed in :mod:`ldm_cli.networks.tags`.

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
its shape. LyCORIS full weight differences and norms, OFT and other formats are refused by
name.

The touched weights are kept (a copy of each, once) and written back when the set of LoRAs
changes or :meth:`Networks.restore` is called, so the base weights come back bit for bit. A
set stays applied between runs that ask for the same LoRAs (the second pass of hires fix, the
next batch) instead of being patched again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from ldm_cli.core.errors import UserError
from ldm_cli.networks.files import LoraFile, find_lora, lora_hash, read_lora
from ldm_cli.networks.keys import LayerTarget, layer_table
from ldm_cli.networks.tags import (
    LoraTag,
    finite_weight,
    is_file_like,
    parse_lora_option,
    parse_tags,
    strip_tags,
)

if TYPE_CHECKING:
    from ldm_cli.models.latent_diffusion import LatentDiffusion
    from ldm_cli.text.embeddings import EmbeddingDatabase


class LoadedModel(Protocol):
    """What LoRA and embeddings need of a pipeline (which sits above this layer)."""

    model: LatentDiffusion
    tokenizer: object


class Prompted(Protocol):
    """A request: anything with a prompt that `dataclasses.replace` can copy."""

    prompt: str


R = TypeVar("R", bound=Prompted)

DEFAULT_LORA_DIR = Path("models") / "Lora"


def lora_deltas(
    model: torch.nn.Module, loras: Sequence[tuple[LoraFile, float, float]]
) -> dict[str, torch.Tensor]:
    """The summed change of every touched parameter (float32, on the parameter's device) for
    LoRAs with their (text encoder, U-Net) multipliers.

    A DoRA layer's change depends on the weight it changes: as in A1111, which patches the
    LoRAs one after another, that is the base weight plus the changes of the layers before it.
    """
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
            total = deltas.get(name)
            current = param
            if layer.magnitude is not None and total is not None:
                current = param.float() + total
            rows = layer.target.rows
            if rows is not None:
                current = current[rows[0] : rows[1]]
            if layer.target.swapped:  # the file's rows: ours with their halves exchanged
                delta = swap_halves(layer.delta(swap_halves(current), lora.path.name)) * weight
            else:
                delta = layer.delta(current, lora.path.name) * weight
            if total is None:
                total = deltas[name] = torch.zeros(param.shape, device=param.device)
            if rows is None:
                total += delta
            else:
                total[rows[0] : rows[1]] += delta
    return deltas


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """The first and second halves of `rows` exchanged (its own inverse)."""
    first, second = rows.chunk(2)
    return torch.cat([second, first])


class Networks:
    """A pipeline's LoRAs and textual-inversion embeddings (``pipe.networks``).

    `lora_dir` is where ``<lora:NAME>`` is looked up, `loras` the ``--lora`` files applied to
    every prompt, `embeddings` the textual-inversion database (``load_embeddings``).
    """

    def __init__(self, pipe: LoadedModel):
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
            value = finite_weight(weight, f"add_lora({os.fspath(spec)!r}, {weight!r})")
            tag = LoraTag(path.stem if is_file_like(str(path)) else str(path), value, value, path)
        self.path_of(tag)  # a missing file is an error now, not at every later run
        self.loras.append(tag)

    def clear_loras(self) -> None:
        """Forget the LoRAs of `add_lora` / ``--lora`` and give the model its base weights."""
        self.loras.clear()
        self.restore()

    def load_embeddings(self, directory: str | os.PathLike) -> EmbeddingDatabase:
        from ldm_cli.text.embeddings import EmbeddingDatabase

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
        if tag.path is not None and (tag.path.is_file() or is_file_like(str(tag.path))):
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
            warn_unmatched(lora)
            self._files[key] = lora
        return self._files[key]

    # -- applying

    def activate(self, requests: Sequence[R]) -> list[R]:
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

    def parameters(self, req: Prompted) -> dict[str, str]:
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


def warn_unmatched(lora: LoraFile) -> None:
    """Layers of a LoRA file that fit nothing in the model are skipped, with a warning."""
    if lora.unmatched:
        some = ", ".join(sorted(lora.unmatched)[:3])
        count, total = len(lora.unmatched), len(lora.unmatched) + len(lora.layers)
        print(
            f"warning: LoRA {lora.path.name}: {count} of {total} layers match nothing in this "
            f"model and are skipped (e.g. {some})",
            file=sys.stderr,
        )
