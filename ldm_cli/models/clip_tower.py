"""The small CLIP the embedded model's text encoder was trained with: an image tower, the
projection heads that meet the text encoder's pooled output, and the in-domain CLIP score
`ldm eval` reports with them (the tower ships beside the model as `*.clip-tower.safetensors`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.models.text_encoder import CLIPTextEncoder

EMBED_DIM = 128


TOWER_WIDTHS = (32, 64, 128)


POOLED_GRID = 4


TOWER_GROUPS = 8


INITIAL_TEMPERATURE = 0.07


MAX_LOGIT_SCALE = math.log(100.0)


class ImageTower(nn.Module):
    """Image in [-1, 1] -> embedding: stride-2 convs, then a POOLED_GRID^2 grid, projected."""

    def __init__(self, embed_dim: int = EMBED_DIM, widths: tuple[int, ...] = TOWER_WIDTHS):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 4, stride=2, padding=1),
                nn.GroupNorm(TOWER_GROUPS, width),
                nn.SiLU(),
            ]
            channels = width
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(TOWER_GROUPS, channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(POOLED_GRID),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        self.projection = nn.Linear(channels * POOLED_GRID**2, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(images))


class ClipHeads(nn.Module):
    """What the in-domain CLIP score needs besides the text encoder: the image tower, the text
    projection and the temperature."""

    def __init__(self, text_hidden: int, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.image_tower = ImageTower(embed_dim)
        self.text_projection = nn.Linear(text_hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at the training size -> unit-norm embeddings."""
        return F.normalize(self.image_tower(images), dim=-1)

    def text_embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text encoder's pooled output -> unit-norm embeddings."""
        return F.normalize(self.text_projection(pooled), dim=-1)


class ClipModel(nn.Module):
    """Text encoder plus heads; ``forward`` returns the symmetric InfoNCE loss of a batch."""

    def __init__(self, text_cfg: TextConfig):
        super().__init__()
        self.text_encoder = CLIPTextEncoder(text_cfg)
        self.heads = ClipHeads(text_cfg.hidden_size)

    def text_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> unit-norm text embeddings."""
        return self.heads.text_embeddings(self.text_encoder.pooled(tokens))

    def similarities(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [texts, images]."""
        return self.text_embeddings(tokens) @ self.heads.image_embeddings(images).T

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        negative_tokens: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CLIP's symmetric loss; with ``negative_tokens`` (one hard negative caption per image,
        ``negative_mask`` False where there is none) each image also ranks its true caption
        above every negative, its own first (NegCLIP)."""
        scale = self.heads.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        image = self.heads.image_embeddings(images)
        logits = scale * (self.text_embeddings(tokens) @ image.T).float()
        targets = torch.arange(len(logits), device=logits.device)
        image_to_text = logits.T
        if negative_tokens is not None:
            negative_logits = scale * (image @ self.text_embeddings(negative_tokens).T).float()
            if negative_mask is not None:
                negative_logits = negative_logits.masked_fill(~negative_mask[None, :], -torch.inf)
            image_to_text = torch.cat([image_to_text, negative_logits], dim=1)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(image_to_text, targets)) / 2


def tokenize(captions: list[str], pad_id: int) -> torch.Tensor:
    from ldm_cli.text.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(pad_id)
    return torch.cat(
        [tokenizer(captions[i : i + ENCODE_BATCH]) for i in range(0, len(captions), ENCODE_BATCH)]
    )


def load_clip_heads(path: str | Path) -> tuple[ClipHeads, int]:
    """The heads saved by stage 2 and the image size they were trained at."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        info = json.loads((f.metadata() or {})["clip_heads"])
    heads = ClipHeads(info["text_hidden"], info["embed_dim"])
    heads.load_state_dict(load_file(str(path)))
    return heads.eval().requires_grad_(False), int(info["image_size"])


@torch.inference_mode()
def in_domain_clip_score(
    heads: ClipHeads, text_encoder: CLIPTextEncoder, images: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """Cosine similarity of each image (float in [-1, 1], [N, 3, S, S]) with its caption."""
    device = next(heads.parameters()).device
    tokens = tokenize(captions, text_encoder.cfg.pad_token_id).to(device)
    text = heads.text_embeddings(text_encoder.pooled(tokens))
    return (heads.image_embeddings(images.to(device)) * text).sum(dim=-1)


ENCODE_BATCH = 256
