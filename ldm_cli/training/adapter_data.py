"""The image folder a LoRA or textual inversion learns from, in kohya's layout.

* Images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) with their captions in same-named
  ``.txt`` files; an image without one takes ``--caption`` (an error when that is not given).
* Subfolders named ``N_anything`` (kohya's DreamBooth layout, ``10_zorp``) are read too, each
  image seen N times per epoch; images directly in the folder are seen ``--repeats`` times.
* ``[name]`` in a caption stands for the concept's word (the TI token, or the LoRA's file name),
  ``[filewords]`` in ``--caption`` for the image's own ``.txt`` caption, as in A1111's templates.
* Any image size: the shorter side is resized to the training size (Lanczos) and the rest
  centre-cropped to a square, as ``ldm train model`` does (no aspect-ratio buckets).
* ``--shuffle-captions`` shuffles the comma-separated parts of a caption after the first
  ``--keep-tokens`` parts at every step; ``--caption-dropout P`` trains a fraction P of the
  examples on the empty caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.core.errors import UserError
from ldm_cli.training.dataset import IMAGE_SUFFIXES, load_square_image

REPEAT_FOLDER = re.compile(r"^(\d+)_.+$")
NAME = "[name]"
FILEWORDS = "[filewords]"


@dataclass(frozen=True)
class CaptionOptions:
    template: str | None = None  # --caption: for images without a .txt (may hold [filewords])
    name: str = ""  # what [name] stands for
    repeats: int = 1
    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0

    def check(self) -> None:
        if self.repeats < 1:
            raise UserError(f"--repeats must be at least 1, not {self.repeats}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--caption-dropout must be in [0, 1), not {self.dropout}")
        if self.keep_tokens < 0:
            raise UserError(f"--keep-tokens must be 0 or more, not {self.keep_tokens}")


@dataclass
class ConceptImages:
    images: torch.Tensor  # uint8 [N, 3, size, size]
    captions: list[str]  # per image, [name] already replaced
    repeats: list[int]  # per image
    files: list[Path]

    def example_rows(self) -> torch.Tensor:
        """The image of every example of one epoch (an image repeated N times is N rows)."""
        return torch.tensor([i for i, n in enumerate(self.repeats) for _ in range(n)])


def caption_for(image: Path, options: CaptionOptions) -> str:
    text_file = image.with_suffix(".txt")
    own = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else None
    if options.template is not None and (own is None or FILEWORDS in options.template):
        caption = options.template.replace(FILEWORDS, own or "")
    elif own is not None:
        caption = own
    else:
        raise UserError(
            f"{image.name} has no caption: put it in {text_file.name} beside the image, or give "
            "--caption TEXT for images without one"
        )
    return caption.replace(NAME, options.name).strip(" ,")


def find_images(data_dir: Path, options: CaptionOptions) -> list[tuple[Path, int]]:
    """(image, repeats) of the folder and its ``N_name`` subfolders, sorted by path."""
    if not data_dir.is_dir():
        raise UserError(f"image folder {data_dir} does not exist")
    found = []
    for path in sorted(data_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((path, options.repeats))
        elif path.is_dir() and (match := REPEAT_FOLDER.match(path.name)):
            repeats = int(match.group(1))
            if repeats < 1:
                raise UserError(f"{path.name}: a repeat count must be at least 1")
            for image in sorted(path.iterdir()):
                if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((image, repeats))
    if not found:
        raise UserError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {data_dir} or its N_name subfolders"
        )
    return found


def load_concept_images(data_dir: Path, size: int, options: CaptionOptions) -> ConceptImages:
    """The folder's images at side `size` with their captions and repeat counts."""
    options.check()
    found = find_images(Path(data_dir), options)
    captions = [caption_for(path, options) for path, _ in found]
    images = torch.stack([torch.from_numpy(load_square_image(path, size)) for path, _ in found])
    return ConceptImages(images, captions, [n for _, n in found], [path for path, _ in found])


def step_captions(
    captions: list[str], options: CaptionOptions, generator: torch.Generator
) -> list[str]:
    """The captions of one step's examples after shuffling and dropout, drawn from
    `generator` (so a resumed run draws the same)."""
    out = []
    for caption in captions:
        if options.shuffle:
            parts = [p.strip() for p in caption.split(",") if p.strip()]
            head, tail = parts[: options.keep_tokens], parts[options.keep_tokens :]
            order = torch.randperm(len(tail), generator=generator).tolist()
            caption = ", ".join(head + [tail[i] for i in order])
        if options.dropout and float(torch.rand((), generator=generator)) < options.dropout:
            caption = ""
        out.append(caption)
    return out
