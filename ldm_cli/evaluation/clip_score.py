"""The in-domain CLIP score of ``ldm eval``.

Stage 2 of ``ldm train`` trains the text encoder contrastively against a small image tower;
the tower and both projections are kept beside the model. The score of an image is the cosine
similarity of its embedding with its prompt's, in that space. It is only meaningful for the
model whose text encoder was trained with the tower, so it is reported next to the same score
for the exact renders of the evaluated scenes (the ceiling the model could reach).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_cli.core.errors import UserError

# Beside a shipped model NAME.safetensors, or the run folder's file beside model.safetensors.
TOWER_SUFFIX = ".clip-tower.safetensors"
RUN_TOWER_FILE = "clip_tower.safetensors"


def find_clip_tower(model_path: Path) -> Path | None:
    stem = model_path.name.removesuffix(".safetensors")
    beside = model_path.with_name(stem + TOWER_SUFFIX)
    for candidate in (beside, model_path.parent / RUN_TOWER_FILE):
        if candidate.is_file():
            return candidate
    return None


class ClipScorer:
    """Scores (PIL image, caption) pairs with a trained tower and the model's text encoder."""

    def __init__(self, tower_path: Path, text_encoder):
        from ldm_cli.models.clip_tower import load_clip_heads

        try:
            self.heads, self.image_size = load_clip_heads(tower_path)
        except UserError:
            raise
        except Exception as error:  # another file: not safetensors, or without the heads
            text = str(error).strip().splitlines()
            reason = type(error).__name__ + (f": {text[0]}" if text else "")
            raise UserError(
                f"{tower_path} is not a CLIP tower saved by `ldm train` ({reason})"
            ) from None
        hidden = text_encoder.cfg.hidden_size
        expected = self.heads.text_projection.in_features
        if hidden != expected:
            raise UserError(
                f"{tower_path} was trained with a {expected}-wide text encoder, "
                f"this model's is {hidden}-wide"
            )
        self.text_encoder = text_encoder
        self.path = tower_path
        self.heads.to(next(text_encoder.parameters()).device)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        side = self.image_size
        arrays = [
            np.asarray(
                image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
                if image.size != (side, side)
                else image.convert("RGB")
            )
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return pixels.float().div(127.5).sub(1.0)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        from ldm_cli.models.clip_tower import in_domain_clip_score

        encoder = self.text_encoder
        scores = in_domain_clip_score(self.heads, encoder, self._pixels(images), captions)
        return [round(float(s), 5) for s in scores.cpu()]
