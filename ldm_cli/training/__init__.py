"""`ldm train`: the whole latent diffusion model, stage by stage, from a captioned image folder.

1. VAE (``vae_stage``), 2. CLIP text encoder (``text_stage``), 3. U-Net (``unet_stage``),
4. export of RUN_DIR/model.safetensors in the original checkpoint layout.
With a base checkpoint (``fine_tune``) stages 1 and 2 are taken from it and stage 3 starts
from its U-Net.

A stage whose final weights exist in the run folder is skipped; an unfinished one continues
from RUN_DIR/<stage>/state with ``resume``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.config import ModelConfig
from ldm_cli.errors import UserError

# Kept free of torch at import time: `ldm --help` imports the CLI, which reads the defaults in
# ldm_cli.training.embedded_config.
if TYPE_CHECKING:
    from ldm_cli.training.dataset import CaptionedImages
    from ldm_cli.training.loop import LoopOptions, StageSettings

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EXPORT_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class TrainPlan:
    data_dir: Path
    config: ModelConfig  # default_size already set to the training size
    vae: StageSettings
    text: StageSettings
    unet: StageSettings
    loop: LoopOptions
    holdout: int | None = None
    export_dtype: str = "fp32"  # or "fp16"
    # The checkpoint whose VAE and text encoder are used frozen instead of training them; a
    # text-to-image config also starts its U-Net from it (x4 upscaler configs: None means the
    # embedded model; others: None trains every stage from scratch).
    base: Path | None = None
    # x4 upscaler configs: the image sides to train at in turn (the first is config's
    # default_size; empty: that one only), and an x4 checkpoint whose U-Net to start from.
    sides: tuple[int, ...] = ()
    init: Path | None = None


@dataclass
class TrainOutcome:
    model_path: Path | None  # None when a stage was stopped early
    metrics: dict


def run_training(plan: TrainPlan) -> TrainOutcome:
    from ldm_cli.detect import is_upscaler_unet
    from ldm_cli.training import text_stage, unet_stage, vae_stage
    from ldm_cli.training.dataset import load_captioned_images
    from ldm_cli.training.loop import is_main_process, note, wait_for_everyone
    from ldm_cli.training.run_log import merge_json

    if is_upscaler_unet(plan.config.unet):
        from ldm_cli.training.upscaler_run import run_upscaler_training

        return run_upscaler_training(plan)
    loop = plan.loop
    main = is_main_process()
    started = time.perf_counter()
    cfg = plan.config
    base = None
    if plan.base is not None:
        from ldm_cli.training.fine_tune import load_fine_tune_base

        base = load_fine_tune_base(plan.base, cfg)
        cfg = base.config
    data = load_captioned_images(plan.data_dir, cfg.default_size)
    train, heldout = split(data, plan.holdout, loop.seed)
    if main:
        loop.run_dir.mkdir(parents=True, exist_ok=True)
        check_run_config(loop.run_dir / CONFIG_FILE, cfg)
        counts = {"images": len(data), "train": len(train), "heldout": len(heldout)}
        merge_json(loop.run_dir / METRICS_FILE, {"data": counts})
        if base is not None:
            base.record(loop.run_dir)
    wait_for_everyone()

    if base is not None:
        vae_model, text_model, init = base.vae, base.text_encoder, base.unet
    else:
        init = None
        if vae_stage.weights_path(loop).is_file():
            note(loop, f"vae: trained already ({vae_stage.weights_path(loop)}), skipped")
            vae = vae_stage.load_vae(cfg.vae, vae_stage.weights_path(loop))
        else:
            vae = vae_stage.train_vae(cfg.vae, train, heldout, plan.vae, loop)
            if vae is None:
                return TrainOutcome(None, _read_metrics(loop))
        cfg, vae_model = cfg.with_(vae=vae.config), vae.vae

        if text_stage.weights_path(loop).is_file() and text_stage.tower_path(loop).is_file():
            note(loop, f"text: trained already ({text_stage.weights_path(loop)}), skipped")
            text_model = text_stage.load_text(cfg.text, loop).text_encoder
        else:
            text = text_stage.train_text(cfg.text, train, heldout, plan.text, loop)
            if text is None:
                return TrainOutcome(None, _read_metrics(loop))
            text_model = text.text_encoder

    if unet_stage.weights_path(loop).is_file():
        note(loop, f"unet: trained already ({unet_stage.weights_path(loop)}), skipped")
        unet = unet_stage.load_unet(cfg, loop)
    else:
        unet = unet_stage.train_unet(
            cfg, vae_model, text_model, train, heldout, plan.unet, loop, init=init
        )
        if unet is None:
            return TrainOutcome(None, _read_metrics(loop))

    path = loop.run_dir / MODEL_FILE
    if main:
        model = unet_stage.assemble_model(cfg, unet.unet, vae_model, text_model)
        sizes = export_model(model, path, plan.export_dtype)
        minutes = round((time.perf_counter() - started) / 60, 2)
        merge_json(loop.run_dir / METRICS_FILE, {"export": {**sizes, "minutes_this_run": minutes}})
    wait_for_everyone()
    return TrainOutcome(path, _read_metrics(loop))


def _read_metrics(loop: LoopOptions) -> dict:
    path = loop.run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def split(
    data: CaptionedImages, holdout: int | None, seed: int
) -> tuple[CaptionedImages, CaptionedImages]:
    from ldm_cli.training.dataset import default_holdout, holdout_split

    count = default_holdout(len(data)) if holdout is None else holdout
    train_idx, heldout_idx = holdout_split(len(data), count, seed)
    return data.subset(train_idx), data.subset(heldout_idx)


def check_run_config(path: Path, cfg: ModelConfig) -> None:
    """Record the architecture in a new run folder; refuse a different one in an existing one.

    The scale factor is measured by stage 1, so it is left out of the comparison.
    """
    from ldm_cli.detect import config_from_json, config_to_json

    if not path.is_file():
        path.write_text(config_to_json(cfg) + "\n", encoding="utf-8")
        return
    saved = config_from_json(path.read_text(encoding="utf-8"))
    if _without_scale(saved) != _without_scale(cfg):
        raise UserError(
            f"{path.parent} was started with a different architecture or --size "
            f"(see {path.name}); use a new --out folder"
        )


def _without_scale(cfg: ModelConfig) -> ModelConfig:
    return cfg.with_(vae=replace(cfg.vae, scale_factor=0.0))


def export_model(model, path: Path, dtype: str = "fp32") -> dict:
    """RUN_DIR/model.safetensors: the full original-layout state dict plus ``ldm_config``."""
    import torch

    from ldm_cli.checkpoint_save import save_checkpoint

    if dtype not in EXPORT_DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use {' or '.join(EXPORT_DTYPES)}")

    state = model.state_dict()
    counts = {
        name: sum(p.numel() for p in part.parameters())
        for name, part in (
            ("unet", model.unet),
            ("vae", model.vae),
            ("text_encoder", model.text_encoder),
        )
    }
    metadata = {"ldm_train": json.dumps({"parameters": counts})}
    save_checkpoint(state, path, model.config, torch.float16 if dtype == "fp16" else None, metadata)
    return {
        "parameters": counts,
        "file_mb": round(path.stat().st_size / 2**20, 2),
        "dtype": dtype,
        "config": asdict(model.config),
    }
