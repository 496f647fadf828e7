"""Textual inversion: embeddings used by name in prompts, as AUTOMATIC1111 uses them.

An embedding is a file in the ``--embeddings`` folder (or below it); its name is the file name
without the extension. Formats, as A1111 reads them:

* ``.pt``/``.bin`` with ``string_to_param`` (``{'*': tensor[n, width]}``, A1111's own),
  loaded with ``torch.load(weights_only=True)``;
* ``.safetensors`` (or ``.pt``) holding one tensor, e.g. ``emb_params`` [n, width], or
  diffusers' ``{token: tensor[width]}``;
* SDXL files with ``clip_l`` [n, 768] and ``clip_g`` [n, 1280], one per text tower.

An embedding whose widths do not fit the model's text encoder(s) is skipped (A1111 does the
same), with a warning.

Where the tokens of an embedding's name appear in a prompt (the tokenizer lower-cases, so
``EasyNegative`` matches ``easynegative``; the longest name wins), A1111 replaces them by n
positions whose input embeddings are the file's n vectors; the rest of the text encoder runs
as usual. Here those positions carry placeholder token ids (``PLACEHOLDER_BASE`` + the vector's
index in the database) through the 75-token chunking of :mod:`ldm_cli.text.chunks`, so an
embedding that does not fit in what is left of a chunk starts the next one, as in A1111, and
chunks with different embeddings never share a cache row. :meth:`EmbeddingDatabase.encode`
gives the text encoder token 0 there (A1111's placeholder) and writes the vectors over the
token embeddings' output with a forward hook.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm_cli.checkpoints.pickled import load_weights_only, pickle_allowed
from ldm_cli.core.errors import UserError
from ldm_cli.core.run_folders import model_files
from ldm_cli.text.tokenizer import CHUNK_TOKENS

PLACEHOLDER_BASE = 1 << 24  # far above any vocabulary
EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")
SINGLE = "*"  # the tower key of files with one tensor (SD 1.x, SD 2.x)


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: dict[str, torch.Tensor]  # tower key -> [n, width], float32
    first_id: int = 0  # placeholder id of its first vector
    _hash: str | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def placeholders(self) -> tuple[int, ...]:
        return tuple(range(self.first_id, self.first_id + self.count))

    @property
    def hash(self) -> str:
        """A1111's short hash: the first 12 hex digits of the file's sha256."""
        if self._hash is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
            self._hash = digest.hexdigest()[:12]
        return self._hash


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file: ``{"*": [n, width]}``, or ``{"clip_l": [n, 768],
    "clip_g": [n, 1280]}`` for SDXL."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = load_weights_only(path)  # refused without --allow-pickle
    except UserError:
        raise
    except OSError as error:
        raise UserError(f"cannot read embedding {path}: {error.strerror or error}") from None
    except Exception as error:  # damaged, or a pickle that is not plain tensors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read embedding {path}: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"embedding {path} is not a textual-inversion file")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"embedding {path} holds {len(params)} terms; one is supported")
        return {SINGLE: _matrix(next(iter(params.values())), path)}
    if "clip_l" in data and "clip_g" in data:
        vectors = {k: _matrix(data[k], path) for k in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise UserError(f"embedding {path}: clip_l and clip_g differ in length")
        return vectors
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and len(data) == 1:  # emb_params, diffusers' {token: vector}
        return {SINGLE: _matrix(tensors[0], path)}
    raise UserError(f"embedding {path} is not a textual-inversion file (keys: {', '.join(data)})")


def _matrix(tensor, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2):
        raise UserError(f"embedding {path} holds no [vectors, width] tensor")
    tensor = tensor.detach().float()
    return tensor[None] if tensor.ndim == 1 else tensor


def towers(text_encoder: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """(tower key, token embedding) of each text tower: ``*`` for SD 1.x/2.x's one encoder,
    ``clip_l`` and ``clip_g`` for SDXL's (each encoder names its own `tower_key` and exposes
    its `token_embedding`)."""
    embedders = getattr(text_encoder, "embedders", None)
    if embedders is None:
        return [(SINGLE, _table(text_encoder))]
    return [(e.tower_key, _table(e)) for e in embedders]


def _table(encoder: nn.Module) -> nn.Embedding:
    table = getattr(encoder, "token_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"no token embedding in {type(encoder).__name__}")
    return table


class EmbeddingDatabase:
    """The embeddings that fit one model, by name, and their placeholder token ids."""

    def __init__(self, tokenizer, widths: dict[str, int]):
        self.tokenizer = tokenizer
        self.widths = widths  # tower key -> width of its token embeddings
        self.embeddings: dict[str, Embedding] = {}
        self.skipped: dict[str, str] = {}
        self._by_first_token: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        self._next_id = PLACEHOLDER_BASE
        self._tables: dict[str, list[torch.Tensor]] = {key: [] for key in widths}

    @classmethod
    def for_model(cls, text_encoder: nn.Module, tokenizer) -> EmbeddingDatabase:
        return cls(tokenizer, {key: table.embedding_dim for key, table in towers(text_encoder)})

    @classmethod
    def from_directory(cls, directory: Path, text_encoder: nn.Module, tokenizer):
        if not directory.is_dir():
            raise UserError(f"embeddings folder {directory} not found")
        db = cls.for_model(text_encoder, tokenizer)
        allowed = pickle_allowed()  # one pickle does not end the run: it is skipped (warned)
        for root, files in model_files(directory):  # training run folders left out
            for file in files:
                path = root / file
                suffix = path.suffix.lower()
                if suffix not in EMBEDDING_EXTENSIONS:
                    continue
                if suffix != ".safetensors" and not allowed:
                    db.skipped[path.stem] = f"{file} is a pickle, read only with --allow-pickle"
                else:
                    db.add(path.stem, path)
        return db

    def add(self, name: str, path: Path, vectors: dict[str, torch.Tensor] | None = None) -> bool:
        """Register an embedding (read from `path` unless `vectors` are given); False when it
        is skipped (it does not fit the model, or the name is taken)."""
        if name in self.embeddings:
            self.skipped[name] = f"{path} has the name of {self.embeddings[name].path}"
            return False
        vectors = read_embedding(path) if vectors is None else vectors
        fits = set(vectors) == set(self.widths) and all(
            vectors[k].ndim == 2 and vectors[k].shape[1] == w for k, w in self.widths.items()
        )
        if not fits:
            have = ", ".join(f"{k} {v.shape[-1]}" for k, v in vectors.items())
            want = ", ".join(f"{k} {w}" for k, w in self.widths.items())
            self.skipped[name] = f"its vectors ({have}) do not fit this model ({want})"
            return False
        ids = tuple(self.tokenizer.encode_ids(name))
        if not ids:
            self.skipped[name] = "its name gives no tokens"
            return False
        embedding = Embedding(name, path, {k: v.float() for k, v in vectors.items()})
        if embedding.count > CHUNK_TOKENS:
            self.skipped[name] = f"its {embedding.count} vectors do not fit in one chunk"
            return False
        embedding.first_id = self._next_id
        self._next_id += embedding.count
        for key in self.widths:
            self._tables[key].append(embedding.vectors[key])
        self.embeddings[name] = embedding
        candidates = self._by_first_token.setdefault(ids[0], [])
        candidates.append((ids, embedding))
        candidates.sort(key=lambda item: len(item[0]), reverse=True)
        return True

    def __len__(self) -> int:
        return len(self.embeddings)

    # -- prompts

    def find(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position` (the longest), with their
        number."""
        for ids, embedding in self._by_first_token.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def scan(self, tokens: Sequence[int]) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(token, ()) for plain tokens; (first token of the name, placeholder ids) where an
        embedding's name stands."""
        position = 0
        while position < len(tokens):
            found = self.find(tokens, position) if self._by_first_token else None
            if found is None:
                yield tokens[position], ()
                position += 1
            else:
                embedding, length = found
                yield tokens[position], embedding.placeholders
                position += length

    def used_in(
        self, prompts: Sequence[str], steps: int, split: Sequence[bool] | None = None
    ) -> list[Embedding]:
        """The embeddings that `prompts` use at any step, in order of first use (`split[i]`:
        prompt i is split at AND, as positive prompts are)."""
        from ldm_cli.text.emphasis import is_break, parse_attention
        from ldm_cli.text.grammar import prompt_schedule, split_and

        used: dict[str, Embedding] = {}
        for index, prompt in enumerate(prompts):
            parts = split_and(prompt) if split is None or split[index] else [(prompt, 1.0)]
            for part, _ in parts:
                for _, text in prompt_schedule(part, steps):
                    for run in parse_attention(text):
                        if is_break(run):
                            continue
                        for _, placeholders in self.scan(self.tokenizer.encode_ids(run[0])):
                            if placeholders:
                                embedding = self.by_id(placeholders[0])
                                used.setdefault(embedding.name, embedding)
        return list(used.values())

    def by_id(self, placeholder: int) -> Embedding:
        for embedding in self.embeddings.values():
            if embedding.first_id <= placeholder < embedding.first_id + embedding.count:
                return embedding
        raise KeyError(placeholder)

    # -- encoding

    def table(self, key: str) -> torch.Tensor:
        """[all placeholder vectors, width] of one tower, in placeholder order."""
        parts = self._tables[key]
        if len(parts) != 1:
            merged = torch.cat(parts) if parts else torch.zeros(0, self.widths[key])
            self._tables[key] = parts = [merged]
        return parts[0]

    def encode(self, text_encoder: nn.Module, tokens: torch.Tensor):
        """``text_encoder(tokens)`` where placeholder ids stand for embedding vectors."""
        mask = tokens >= PLACEHOLDER_BASE
        if not bool(mask.any()):
            return text_encoder(tokens)
        index = (tokens[mask] - PLACEHOLDER_BASE).cpu()
        with self.injected(text_encoder, mask, index):
            return text_encoder(torch.where(mask, torch.zeros_like(tokens), tokens))

    @contextmanager
    def injected(self, text_encoder: nn.Module, mask: torch.Tensor, index: torch.Tensor):
        """While active, each tower's token embeddings at `mask` ([N, L]) are the vectors
        `index` of its table (in mask order)."""
        handles = []
        for key, embedding in towers(text_encoder):
            vectors = self.table(key)[index]

            def hook(module, args, output, vectors=vectors):
                if output.shape[:-1] != mask.shape:
                    raise ValueError("token embeddings and placeholder mask differ in shape")
                output = output.clone()
                output[mask.to(output.device)] = vectors.to(output.device, output.dtype)
                return output

            handles.append(embedding.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def encode_truncated(db: EmbeddingDatabase, text_encoder: nn.Module, prompts: Sequence[str]):
    """`text_encoder` on one 77-token row per prompt, cut after 75 tokens as the plain
    tokenizer cuts, with embedding names replaced by their vectors (for conditioning that does
    not go through the chunked prompt path, such as SDXL's)."""
    tokenizer = db.tokenizer
    rows = []
    for prompt in prompts:
        ids = [i for token, ids in db.scan(tokenizer.encode_ids(prompt)) for i in ids or (token,)]
        ids = ids[:CHUNK_TOKENS]
        padding = [tokenizer.pad_id] * (CHUNK_TOKENS - len(ids))
        rows.append([tokenizer.bos_id, *ids, tokenizer.eos_id, *padding])
    device = next(text_encoder.parameters()).device
    return db.encode(text_encoder, torch.tensor(rows, dtype=torch.long, device=device))
