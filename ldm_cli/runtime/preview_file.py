"""Which file `--preview FILE` may replace: none that it did not write itself.

A preview is rewritten every few steps, so an existing file at its path is normal when it is the
preview of an earlier run, and data loss otherwise (the input photo, a model, an image of an
earlier run). Previews carry a PNG text chunk that marks them; any other existing file is
refused before anything loads. torch is not imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm_cli.core.errors import UserError

PREVIEW_KEY = "ldm-preview"  # the text chunk that marks a PNG written by PreviewWriter


def is_preview(path: Path) -> bool:
    """Whether `path` is a PNG that a PreviewWriter wrote."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and PREVIEW_KEY in image.info
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def check_preview_path(path: Path, flag: str = "--preview") -> None:
    """A one-line error unless `path` is a new file in a writable folder or an earlier preview."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{flag}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: folder {folder} is not writable")
    if (path.exists() or path.is_symlink()) and not is_preview(path):
        raise UserError(
            f"{flag} {path} exists and is not an ldm preview; give a new file name (a preview "
            "replaces only a preview)"
        )
