"""Stage 2: the CLIP text encoder, trained contrastively against a small image tower.

The text side is the encoder's pooled output (final layer norm at the end token) through a
linear projection; the image side a few strided convolutions, pooled to a coarse grid (so it
can still tell where things are) and projected. The symmetric InfoNCE loss with a learnable
temperature is CLIP's. The tower and both projections are kept in RUN_DIR/clip_tower.safetensors
for the in-domain CLIP score of ``ldm eval``; the encoder itself goes into the exported model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.core.config import TextConfig
from ldm_cli.models.clip_tower import (
    EMBED_DIM,
    ENCODE_BATCH,
    ClipHeads,
    ClipModel,
    load_clip_heads,
    tokenize,
)
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.training.dataset import CaptionedImages, to_model_range
from ldm_cli.training.hard_negatives import hard_negatives, swapped_word
from ldm_cli.training.loop import (
    StepRandom,
    is_main_process,
    stage_dir,
    train_stage,
    wait_for_everyone,
)
from ldm_cli.training.run_log import merge_json
from ldm_cli.training.settings import LoopOptions, StageSettings

STAGE = "text"
WEIGHTS_FILE = "weights.safetensors"
TOWER_FILE = "clip_tower.safetensors"
RETRIEVAL_BATCH = 256


@dataclass
class TextResult:
    text_encoder: CLIPTextEncoder
    heads: ClipHeads
    metrics: dict


def weights_path(options: LoopOptions) -> Path:
    return stage_dir(options, STAGE) / WEIGHTS_FILE


def tower_path(options: LoopOptions) -> Path:
    return options.run_dir / TOWER_FILE


def train_text(
    cfg: TextConfig,
    train: CaptionedImages,
    heldout: CaptionedImages,
    settings: StageSettings,
    options: LoopOptions,
    fingerprint: dict | None = None,
) -> TextResult | None:
    """Train (or resume) the text encoder; returns None when stopped early by ``stop_after``.
    ``fingerprint``: what else defines the run, checked on --resume (`loop.train_stage`)."""
    torch.manual_seed(options.seed + 1)
    model = ClipModel(cfg)
    images = train.images
    tokens = tokenize(train.captions, cfg.pad_token_id)

    def loss_fn(prepared, draws: StepRandom) -> torch.Tensor:
        indices = draws.batch_indices(len(images), settings.batch_size)
        device = next(prepared.parameters()).device
        negatives, mask = hard_negatives([train.captions[i] for i in indices.tolist()], draws.local)
        return prepared(
            to_model_range(images[indices]).to(device),
            tokens[indices].to(device),
            tokenize(negatives, cfg.pad_token_id).to(device),
            mask.to(device),
        )

    result = train_stage(STAGE, model, loss_fn, settings, options, fingerprint=fingerprint)
    if not result.finished:
        return None
    model = result.model.eval().requires_grad_(False)
    accuracy, batch = retrieval_accuracy(model, heldout)
    metrics = {
        "retrieval_top1": round(accuracy, 4),
        "retrieval_batch": batch,
        "chance": round(1 / batch, 4),
        **{
            f"{group}_swap_accuracy": round(swap_accuracy(model, heldout, group), 4)
            for group in ("shape", "colour", "size")
        },
        "steps": result.step,
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
    }
    if is_main_process():
        save_text(model, cfg, weights_path(options), tower_path(options), train.images.shape[-1])
        merge_json(options.run_dir / "metrics.json", {STAGE: metrics})
    wait_for_everyone()
    return TextResult(model.text_encoder, model.heads, metrics)


@torch.inference_mode()
def retrieval_accuracy(model: ClipModel, heldout: CaptionedImages) -> tuple[float, int]:
    """Top-1 text -> image accuracy within held-out batches of RETRIEVAL_BATCH (or fewer)."""
    batch = min(RETRIEVAL_BATCH, len(heldout))
    device = next(model.parameters()).device
    tokens = tokenize(heldout.captions, model.text_encoder.cfg.pad_token_id)
    correct = total = 0
    for start in range(0, len(heldout) - batch + 1, batch):
        images = to_model_range(heldout.images[start : start + batch]).to(device)
        sims = model.similarities(images, tokens[start : start + batch].to(device))
        correct += int((sims.argmax(dim=1) == torch.arange(batch, device=device)).sum())
        total += batch
    return correct / total, batch


@torch.inference_mode()
def swap_accuracy(model: ClipModel, heldout: CaptionedImages, group: str) -> float:
    """How often a held-out image is closer to its caption than to the caption with the first
    word of ``group`` (e.g. its shape) replaced by the group's next word; chance is 0.5."""
    pairs = [(i, swapped_word(c, group)) for i, c in enumerate(heldout.captions)]
    pairs = [(i, c) for i, c in pairs if c is not None]
    if not pairs:
        return float("nan")
    device = next(model.parameters()).device
    pad = model.text_encoder.cfg.pad_token_id
    wins = 0
    for start in range(0, len(pairs), ENCODE_BATCH):
        chunk = pairs[start : start + ENCODE_BATCH]
        index = [i for i, _ in chunk]
        image = model.heads.image_embeddings(to_model_range(heldout.images[index]).to(device))
        true = tokenize([heldout.captions[i] for i in index], pad).to(device)
        false = tokenize([c for _, c in chunk], pad).to(device)
        sims = [(image * model.text_embeddings(t)).sum(-1) for t in (true, false)]
        wins += int((sims[0] > sims[1]).sum())
    return wins / len(pairs)


def save_text(
    model: ClipModel, cfg: TextConfig, encoder_path: Path, heads_path: Path, image_size: int
) -> None:
    from ldm_cli.checkpoints.save import save_checkpoint

    save_checkpoint(model.text_encoder.state_dict(), encoder_path)
    metadata = {
        "clip_heads": json.dumps(
            {"text_hidden": cfg.hidden_size, "embed_dim": EMBED_DIM, "image_size": image_size}
        )
    }
    save_checkpoint(model.heads.state_dict(), heads_path, metadata=metadata)


def load_text(cfg: TextConfig, options: LoopOptions) -> TextResult:
    """The finished stage from its weights files."""
    from safetensors.torch import load_file

    encoder = CLIPTextEncoder(cfg)
    encoder.load_state_dict(load_file(str(weights_path(options))))
    heads, _ = load_clip_heads(tower_path(options))
    metrics = {}
    return TextResult(encoder.eval().requires_grad_(False), heads, metrics)
