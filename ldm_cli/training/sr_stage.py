"""`ldm train upscaler`: the embedded super-resolution network, trained on offline images.

The network is Real-ESRGAN's compact SRVGG layout (`ldm_cli.models.sr_compact`):
every convolution runs at the input's size and one pixel shuffle makes the output, so a
256->1024 upscale costs about a second on two CPU cores, and the file loads in every tool that
reads Real-ESRGAN files (spandrel, ComfyUI, chaiNNer). It learns the residual over the
nearest-upsampled input with an L1 loss on 8-bit pixels (the loss PSNR-oriented SR networks
use: EDSR, Real-ESRNet), AdamW with warm-up and cosine decay and an EMA of the weights, from
pairs drawn by `sr_pairs` out of the images `sr_sources` makes. Held-out photos are measured
against bicubic at the end and written into the file's metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.data.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS
from ldm_cli.evaluation.upscalers import evaluate_photos
from ldm_cli.models.sr_compact import CompactShape, SRVGGCompact
from ldm_cli.pipeline.tasks.image_upscaler import (
    METADATA_KEY,
    ImageUpscaler,
    compact_upscaler,
)
from ldm_cli.training.loop import note, stage_dir, train_stage
from ldm_cli.training.run_log import merge_json
from ldm_cli.training.run_settings import path_key
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.sr_init import linear_start
from ldm_cli.training.sr_pairs import SourcePool, mosaic, sample_batch
from ldm_cli.training.sr_sources import photo_sources, shapes_sources, text_sources, texture_sources

STAGE = "sr"
EMA_DECAY = 0.999
SHAPES_COUNT = 600
TEXTURES_COUNT = 300
TEXT_COUNT = 120
LINEAR_FIT_BATCHES, LINEAR_FIT_BATCH = 16, 32  # 512 pairs: plenty for 10 coefficients
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class SrPlan:
    run_dir: Path
    shape: CompactShape
    settings: StageSettings
    loop: LoopOptions
    low_side: int = 32  # low-res patch side
    extra_dirs: tuple[Path, ...] = ()  # the user's own images, added to the photos
    export_dtype: str = "fp16"
    # What the pool holds (fewer make a quick test run).
    photos: tuple[str, ...] = TRAIN_PHOTOS
    counts: tuple[int, int, int] = (SHAPES_COUNT, TEXTURES_COUNT, TEXT_COUNT)  # shapes, ...
    heldout: tuple[str, ...] = HELDOUT_PHOTOS


def load_folder_images(folder: Path) -> list[np.ndarray]:
    from ldm_cli.core.errors import UserError
    from ldm_cli.core.image_inputs import load_image

    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
    if not folder.is_dir():
        raise UserError(f"--images: not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise UserError(f"--images: no images in {folder}")
    return [np.asarray(load_image(p)) for p in files]


def build_pool(plan: SrPlan) -> SourcePool:
    rng = np.random.default_rng(plan.loop.seed)
    need = (plan.low_side + 8) * plan.shape.scale  # the padded crop, with room to move
    photos = photo_sources(plan.photos)
    for folder in plan.extra_dirs:
        photos += load_folder_images(folder)
    shapes, textures, text = plan.counts
    kinds = {
        "photos": [p for p in photos if min(p.shape[:2]) >= need],
        "shapes": mosaic(shapes_sources(rng, shapes), need),
        "textures": texture_sources(rng, textures, max(256, need)),
        "text": text_sources(rng, text, max(256, need)),
    }
    return SourcePool(kinds)


def frozen_copy(module: torch.nn.Module, shape: CompactShape) -> ImageUpscaler:
    """The trained network as `ldm upscale` will run it, on the CPU in float32."""
    copy = SRVGGCompact(shape)
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()})
    return compact_upscaler(copy, "ldm-sr")


def export(module: torch.nn.Module, path: Path, dtype: str, record: dict) -> float:
    """The network in Real-ESRGAN's compact layout, with its training record as metadata;
    returns the size in MB."""
    from safetensors.torch import save_file

    target = torch.float16 if dtype == "fp16" else torch.float32
    state = {k: v.detach().to("cpu", target).contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
    tmp.chmod(0o644)  # safetensors writes 0600
    tmp.replace(path)
    return round(path.stat().st_size / 2**20, 3)


def train_sr(plan: SrPlan) -> dict:
    """Train (or resume) the network, measure it and export RUN_DIR/model.safetensors; returns
    the metrics (without `export` when stopped early by ``stop_after``)."""
    started = time.perf_counter()
    loop, scale = plan.loop, plan.shape.scale
    loop.run_dir.mkdir(parents=True, exist_ok=True)
    note(loop, f"{STAGE}: making the training images")
    pool = build_pool(plan)
    merge_json(loop.run_dir / METRICS_FILE, {"sources": pool.sizes(), "plan": _plan_record(plan)})
    torch.manual_seed(loop.seed)
    gen = torch.Generator().manual_seed(loop.seed + 1)
    fit_pairs = [
        sample_batch(pool, scale, plan.low_side, 32, gen) for _ in range(LINEAR_FIT_BATCHES)
    ]
    network, start = linear_start(SRVGGCompact(plan.shape), fit_pairs, loop.seed)
    merge_json(loop.run_dir / METRICS_FILE, {"start": start})

    def loss_fn(model, draws) -> torch.Tensor:
        low, high = sample_batch(pool, scale, plan.low_side, plan.settings.batch_size, draws.local)
        device = next(model.parameters()).device
        return (model(low.to(device)) - high.to(device)).abs().mean()

    fingerprint = {
        "shape": asdict(plan.shape),
        "low_side": plan.low_side,
        "images": [path_key(folder) for folder in plan.extra_dirs],
        "photos": list(plan.photos),
        "counts": list(plan.counts),
    }
    result = train_stage(
        STAGE, network, loss_fn, plan.settings, loop, EMA_DECAY, fingerprint=fingerprint
    )
    if not result.finished:
        return json.loads((loop.run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    note(loop, f"{STAGE}: held-out photos against bicubic")
    upscaler = frozen_copy(result.ema, plan.shape)
    heldout = evaluate_photos(upscaler, plan.heldout)
    record = {
        "architecture": "Real-ESRGAN SRVGGNetCompact",
        "shape": asdict(plan.shape),
        "steps": result.step,
        "final_l1": result.final_loss(),
        "heldout_photos": heldout,
        "plan": _plan_record(plan),
    }
    path = loop.run_dir / MODEL_FILE
    size = export(result.ema, path, plan.export_dtype, record)
    minutes = round((time.perf_counter() - started) / 60, 2)
    merge_json(
        loop.run_dir / METRICS_FILE,
        {**record, "export": {"file_mb": size, "minutes_this_run": minutes}},
    )
    return json.loads((loop.run_dir / METRICS_FILE).read_text(encoding="utf-8"))


def _plan_record(plan: SrPlan) -> dict:
    return {
        "scale": plan.shape.scale,
        "low_side": plan.low_side,
        "batch_size": plan.settings.batch_size,
        "lr": plan.settings.lr,
        "steps": plan.settings.steps,
        "seed": plan.loop.seed,
        "extra_dirs": [str(p) for p in plan.extra_dirs],
    }


def stage_weights_dir(loop: LoopOptions) -> Path:
    return stage_dir(loop, STAGE)
