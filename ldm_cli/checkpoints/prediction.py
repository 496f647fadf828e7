"""What a U-Net predicts (eps or v) and the text layer it is conditioned on, as load-time options.

Whether an SD 2.x U-Net predicts eps or v is not in its tensor shapes. In order, it is settled by
``--prediction``; by the file (``ldm_config`` metadata, a ``v_pred`` marker tensor, or a family
that has only one kind); else by the probe AUTOMATIC1111 uses for SD 2.x
(:func:`ldm_cli.models.prediction_probe.probe_prediction`). No torch here: ``ldm info`` imports it.
"""

from __future__ import annotations

from dataclasses import replace

from ldm_cli.checkpoints.detect.sd2 import SD2_SIZES, V_PRED_KEY
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError

PREDICTIONS = ("eps", "v")


def check_prediction(prediction: str | None) -> None:
    if prediction is not None and prediction not in PREDICTIONS:
        raise UserError(f"unknown --prediction {prediction!r}; use eps or v")


def with_clip_skip(cfg: ModelConfig, clip_skip: int | None) -> ModelConfig:
    """`cfg` with the text encoder's output taken `clip_skip` layers from the end (1 = last)."""
    if clip_skip is None:
        return cfg
    layers = min(text.num_hidden_layers for text in cfg.text_encoders)  # SDXL: both towers
    if not 1 <= clip_skip <= layers:
        raise UserError(
            f"--clip-skip must be between 1 (last layer) and {layers} for this model, "
            f"got {clip_skip}"
        )
    cfg = cfg.with_(text=replace(cfg.text, clip_skip=clip_skip))
    if cfg.text2 is not None:
        cfg = cfg.with_(text2=replace(cfg.text2, clip_skip=clip_skip))
    return cfg


def settled_prediction(cfg: ModelConfig, header: CheckpointHeader) -> str | None:
    """The prediction type the file itself tells, or None when only the probe can."""
    if cfg.family != "sd2" or "ldm_config" in header.metadata or V_PRED_KEY in header.tensors:
        return cfg.prediction
    return None


def with_prediction(cfg: ModelConfig, header: CheckpointHeader, prediction: str) -> ModelConfig:
    """`cfg` predicting `prediction`; a shape-detected SD 2.x model also takes that kind's
    native size (768 for v, 512 for eps)."""
    check_prediction(prediction)
    cfg = cfg.with_(prediction=prediction)
    if cfg.family == "sd2" and "ldm_config" not in header.metadata:
        cfg = cfg.with_(default_size=SD2_SIZES[prediction])
    return cfg
