"""`ldm train --config embedded-x4`: an x4 upscaler on top of an existing model.

The base checkpoint (`--base`, default: the embedded model) lends its VAE and text encoder,
frozen; their shapes replace the config's `vae` and `text`, and the U-Net's latent channels and
context width follow them. One stage trains (``upscaler_stage``), then held-out PSNR against
bicubic is measured and RUN_DIR/model.safetensors is exported in the original key layout.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError
from ldm_cli.training.plan import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TrainOutcome,
    TrainPlan,
    check_run_config,
    check_run_data,
    export_model,
    read_metrics,
    run_data,
    split,
)

UPSCALE_FACTOR = 4


def upscaler_config(cfg: ModelConfig, base: ModelConfig) -> ModelConfig:
    """`cfg`'s U-Net around `base`'s VAE and text encoder."""
    if base.vae.downscale != UPSCALE_FACTOR:
        raise UserError(
            f"the base model's VAE downsamples {base.vae.downscale}x; an x4 upscaler needs an "
            f"f={UPSCALE_FACTOR} VAE"
        )
    latent = base.vae.embed_dim
    unet = replace(
        cfg.unet,
        in_channels=latent + 3,
        out_channels=latent,
        context_dim=base.text.hidden_size,
    )
    return cfg.with_(unet=unet, vae=base.vae, text=base.text)


def load_base(path: Path | None):
    """The base model (default: the embedded one), in float32 on the CPU."""
    import torch

    from ldm_cli.core.embedded import default_model_path
    from ldm_cli.models.loading import load_model

    if path is None:
        try:
            path = default_model_path()
        except UserError as e:
            raise UserError(f"{e}".replace("--model", "--base")) from None
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    return model


def larger_sides(plan: TrainPlan, count: int, side: int) -> list:
    """The training images again at each of `plan.sides` past the first, as many of them as
    hold the first set's pixels (the first ones of the training split)."""
    from ldm_cli.training.dataset import default_holdout, holdout_split, load_captioned_images

    if not plan.sides:
        return []
    holdout = default_holdout(count) if plan.holdout is None else plan.holdout
    train_idx, _ = holdout_split(count, holdout, plan.loop.seed)
    out = []
    for larger in plan.sides[1:]:
        keep = max(1, len(train_idx) * side**2 // larger**2)
        out.append(load_captioned_images(plan.data_dir, larger, train_idx[:keep]))
    return out


def load_init(path: Path | None, cfg: ModelConfig):
    """The U-Net of an x4 upscaler checkpoint to fine-tune (`--init`), checked against `cfg`."""
    if path is None:
        return None
    import torch

    from ldm_cli.models.loading import load_model

    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    if model.config.unet != cfg.unet:
        raise UserError(f"--init {path.name}: its U-Net is not this config's")
    return model.unet


def run_upscaler_training(plan: TrainPlan) -> TrainOutcome:
    from ldm_cli.training import upscaler_stage
    from ldm_cli.training.dataset import load_captioned_images
    from ldm_cli.training.loop import is_main_process, note, wait_for_everyone
    from ldm_cli.training.run_log import merge_json
    from ldm_cli.training.run_settings import data_fingerprint, path_key
    from ldm_cli.training.unet_stage import assemble_model

    loop = plan.loop
    main = is_main_process()
    started = time.perf_counter()
    base = load_base(plan.base)
    cfg = upscaler_config(plan.config, base.config)
    data = load_captioned_images(plan.data_dir, cfg.default_size)
    train, heldout = split(data, plan.holdout, loop.seed)
    record = run_data(plan.data_dir, len(data), len(train), len(heldout))
    check_run_data(loop.run_dir, record, plan.base)
    train_sets = [train] + larger_sides(plan, len(data), cfg.default_size)
    if main:
        loop.run_dir.mkdir(parents=True, exist_ok=True)
        check_run_config(loop.run_dir / CONFIG_FILE, cfg)
        merge_json(loop.run_dir / METRICS_FILE, {"data": record})
        if plan.base is not None:
            merge_json(loop.run_dir / METRICS_FILE, {"base": {"path": path_key(plan.base)}})
    wait_for_everyone()
    fingerprint = data_fingerprint(
        plan.data_dir,
        len(data),
        heldout=len(heldout),
        size=cfg.default_size,
        sides=[int(part.images.shape[-1]) for part in train_sets],
        base=path_key(plan.base),
        init=path_key(plan.init),
    )

    vae, text = base.vae, base.text_encoder
    if upscaler_stage.weights_path(loop).is_file():
        note(loop, f"upscaler: trained already ({upscaler_stage.weights_path(loop)}), skipped")
        result = upscaler_stage.load_upscaler(cfg, loop)
    else:
        init = load_init(plan.init, cfg)
        result = upscaler_stage.train_upscaler(
            cfg, vae, text, train_sets, heldout, plan.unet, loop, init=init, fingerprint=fingerprint
        )
        if result is None:
            return TrainOutcome(None, read_metrics(loop))

    path = loop.run_dir / MODEL_FILE
    if main:
        note(loop, f"{upscaler_stage.STAGE}: held-out PSNR against bicubic")
        pipe = upscaler_stage.stage_pipeline(cfg, result.unet, vae, text)
        metrics = upscaler_stage.evaluate(pipe, heldout, loop.seed)
        merge_json(loop.run_dir / METRICS_FILE, {"upscaler_eval": metrics})
        model = assemble_model(cfg, result.unet, vae, text)
        sizes = export_model(model.to("cpu"), path, plan.export_dtype)
        minutes = round((time.perf_counter() - started) / 60, 2)
        merge_json(loop.run_dir / METRICS_FILE, {"export": {**sizes, "minutes_this_run": minutes}})
    wait_for_everyone()
    return TrainOutcome(path, read_metrics(loop))
