"""The checkpoints the server offers (`--model` and the files of `--models-dir`) under A1111's
titles ("name.safetensors [hash]"), and a client's name for one back to its file. Clients
name files by title, file name or stem only; a path outside these is never opened."""

from __future__ import annotations

import re
from pathlib import Path

from ldm_cli.core.errors import UserError

CHECKPOINT_EXTENSIONS = (".safetensors", ".sft", ".gguf")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


class Checkpoints:
    def __init__(self, model: Path, models_dir: Path | None):
        self.model = Path(model)
        self.models_dir = models_dir
        self.hashes: dict[Path, str] = {}  # of the models loaded so far (their pipe.model_hash)

    def files(self) -> list[Path]:
        found = [self.model]
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in sorted(self.models_dir.rglob("*")):
                wanted = path.is_file() and path.suffix.lower() in CHECKPOINT_EXTENSIONS
                if wanted and path.resolve() != self.model.resolve():
                    found.append(path)
        return found

    def name(self, path: Path) -> str:
        """A1111's file name of a checkpoint: relative to the models folder where inside it."""
        if self.models_dir is not None:
            try:
                return path.resolve().relative_to(self.models_dir.resolve()).as_posix()
            except ValueError:
                pass
        return path.name

    def title(self, path: Path) -> str:
        digest = self.hashes.get(Path(path))
        return f"{self.name(path)} [{digest}]" if digest else self.name(path)

    def items(self) -> list[dict]:
        """GET /sdapi/v1/sd-models: A1111's SDModelItem of each file."""
        return [
            {
                "title": self.title(path),
                "model_name": Path(self.name(path)).with_suffix("").as_posix(),
                "hash": self.hashes.get(path), "sha256": None, "filename": str(path.resolve()),
                "config": None,
            }
            for path in self.files()
        ]  # fmt: skip

    def find(self, name: str) -> Path:
        """The file a client names by title, file name (with or without its folder inside the
        models folder) or name without extension."""
        wanted = _HASH_SUFFIX.sub("", name.strip())
        for path in self.files():
            label = self.name(path)
            if wanted in (label, path.name, Path(label).with_suffix("").as_posix(), path.stem):
                return path
        raise UserError(f"sd_model_checkpoint: model {name!r} not found")
