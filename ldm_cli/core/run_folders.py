"""Training run folders inside folders of models: `ldm train ti -o embeddings/NAME.safetensors`
keeps its state, log and previews in ``embeddings/NAME.train/``, whose saved state holds
tensors too. Folder scans for embeddings and LoRAs skip every run folder (marked by its
training log), or a run's state would be read as one more file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

RUN_LOG = "train_log.jsonl"  # what marks a run folder (ldm_cli.training.run_log writes it)


def model_files(directory: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its file names) of `directory` and its subfolders in sorted order, links
    followed, run folders left out."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not (Path(root) / d / RUN_LOG).is_file()]
        found.append((root, sorted(files)))
    for root, files in sorted(found):
        yield Path(root), files
