"""A captioned image folder, preloaded into RAM as one uint8 tensor.

Captions come from ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line, the Hugging
Face imagefolder layout) when present, otherwise from a ``.txt`` file beside each image.
Images are resized (shorter side) and centre-cropped to a square of ``size`` pixels. Smaller
images would be enlarged: `ldm train model` refuses a --size above the smallest image's shorter
side first (`check_image_sides`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_cli.core.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# PIL decodes and resizes with the GIL released, so a few threads overlap file reads.
LOADER_THREADS = 4


@dataclass
class CaptionedImages:
    images: torch.Tensor  # uint8 [N, 3, size, size]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: torch.Tensor) -> CaptionedImages:
        return CaptionedImages(self.images[indices], [self.captions[int(i)] for i in indices])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, rounding and clamping."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def find_captioned_files(data_dir: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs, sorted by file name."""
    if not data_dir.is_dir():
        raise UserError(f"dataset folder {data_dir} does not exist")
    metadata = data_dir / METADATA_FILE
    if metadata.is_file():
        return _from_metadata(data_dir, metadata)
    pairs = []
    for path in sorted(data_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            raise UserError(f"{path.name} has no caption: expected {caption_file.name} beside it")
        pairs.append((path, caption_file.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise UserError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {data_dir}; "
            "make one with `ldm dataset shapes`"
        )
    return pairs


def _from_metadata(data_dir: Path, metadata: Path) -> list[tuple[Path, str]]:
    pairs = []
    with open(metadata, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, text = record["file_name"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{metadata.name} line {number}: expected {{'file_name': ..., 'text': ...}}"
                ) from e
            path = data_dir / name
            if not path.is_file():
                raise UserError(f"{metadata.name} line {number}: {name} does not exist")
            pairs.append((path, str(text).strip()))
    if not pairs:
        raise UserError(f"{metadata} lists no images")
    return pairs


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from e


def smallest_image(data_dir: str | Path) -> tuple[Path, int, int]:
    """The folder's image with the shortest shorter side: (path, width, height)."""
    paths = [path for path, _ in find_captioned_files(Path(data_dir))]
    with ThreadPoolExecutor(LOADER_THREADS) as pool:
        sizes = list(pool.map(image_size, paths))
    index = min(range(len(paths)), key=lambda i: min(sizes[i]))
    return (paths[index], *sizes[index])


def check_image_sides(data_dir: str | Path, side: int, option: str = "--size") -> None:
    """Refuse to train at ``side`` pixels when an image of the folder is smaller: it would be
    enlarged, and the model would learn the blur of the enlargement."""
    path, width, height = smallest_image(data_dir)
    if min(width, height) < side:
        raise UserError(
            f"{option} {side} is larger than the images of {data_dir}: {path.name} is "
            f"{width}x{height}, and images are never enlarged for training; use at most "
            f"{min(width, height)} px (or larger images)"
        )


def load_square_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (Lanczos), centre-cropped: uint8 [3, size, size]."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from e
    width, height = image.size
    scale = size / min(width, height)
    if (width, height) != (size, size):
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        left = (image.width - size) // 2
        top = (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.array(image).transpose(2, 0, 1)


def load_captioned_images(
    data_dir: str | Path, size: int, indices: torch.Tensor | None = None
) -> CaptionedImages:
    """The folder's images at side `size` (all, or those at `indices` of its sorted list)."""
    pairs = find_captioned_files(Path(data_dir))
    if indices is not None:
        pairs = [pairs[int(i)] for i in indices]
    images = torch.empty((len(pairs), 3, size, size), dtype=torch.uint8)

    def load(index: int) -> None:
        images[index] = torch.from_numpy(load_square_image(pairs[index][0], size))

    with ThreadPoolExecutor(LOADER_THREADS) as pool:
        list(pool.map(load, range(len(pairs))))
    return CaptionedImages(images, [caption for _, caption in pairs])


def holdout_split(count: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a seeded random ``holdout`` of the ``count`` items."""
    if not 0 < holdout < count:
        raise UserError(
            f"cannot hold out {holdout} of {count} images for evaluation; --holdout takes 1 to "
            f"{count - 1}"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def default_holdout(count: int) -> int:
    """5% of the images, at least 4 and at most 512, always leaving most for training."""
    return max(1, min(512, max(4, count // 20), count // 4))
