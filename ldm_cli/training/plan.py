"""A training run's plan, outcome and files: what `ldm train model` is asked to do
(`TrainPlan`), the run folder's config, metrics and exported model, and the held-out split."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError

# Kept free of torch at import time: `ldm --help` imports the CLI, which reads the defaults in
# ldm_cli.training.embedded_config.
if TYPE_CHECKING:
    from ldm_cli.training.dataset import CaptionedImages
    from ldm_cli.training.settings import LoopOptions, StageSettings

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
    # what the U-Net learns to predict: None keeps the config's (or the base's) eps or v;
    # "flow" trains the rectified-flow velocity (unet_stage.flow_loss)
    objective: str | None = None


@dataclass
class TrainOutcome:
    model_path: Path | None  # None when a stage was stopped early
    metrics: dict


def read_metrics(loop: LoopOptions) -> dict:
    path = loop.run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def split(
    data: CaptionedImages, holdout: int | None, seed: int
) -> tuple[CaptionedImages, CaptionedImages]:
    from ldm_cli.training.dataset import default_holdout, holdout_split

    count = default_holdout(len(data)) if holdout is None else holdout
    train_idx, heldout_idx = holdout_split(len(data), count, seed)
    return data.subset(train_idx), data.subset(heldout_idx)


def run_data(data_dir: Path, images: int, train: int, heldout: int) -> dict:
    """The run's data as metrics.json records it under ``data`` (the folder absolute)."""
    from ldm_cli.training.run_settings import path_key

    return {"folder": path_key(data_dir), "images": images, "train": train, "heldout": heldout}


def check_run_data(run_dir: Path, data: dict, base: Path | None) -> None:
    """Refuse a run folder whose run was made from other data (another folder, another image
    count, another --holdout) or on another --base: its finished stages would be mixed with
    this run's, and its metrics rewritten as if made from this data. One line, naming each
    difference; a folder without metrics (a new run) passes."""
    from ldm_cli.training.run_settings import changed_settings, path_key

    metrics = read_metrics_file(run_dir / METRICS_FILE)
    old = metrics.get("data")
    if not isinstance(old, dict):
        return
    keys = [key for key in data if key in old]  # folders written before "folder" was kept
    before, now = {key: old[key] for key in keys}, {key: data[key] for key in keys}
    if "folder" in old:
        before["base"] = (metrics.get("base") or {}).get("path")
        now["base"] = path_key(base)
    changes = changed_settings(before, now)
    if changes:
        raise UserError(
            f"{run_dir} holds a run made with {'; '.join(changes)}; give this one a new --out"
        )


def read_metrics_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a metrics file ({e}); use a new --out folder") from e
    return data if isinstance(data, dict) else {}


def check_run_config(path: Path, cfg: ModelConfig) -> None:
    """Record the architecture in a new run folder; refuse a different one in an existing one.

    The scale factor is measured by stage 1, so it is left out of the comparison.
    """
    from ldm_cli.checkpoints.detect import config_from_json, config_to_json

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

    from ldm_cli.checkpoints.save import save_checkpoint

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
