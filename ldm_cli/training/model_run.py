"""`ldm train model`: the whole latent diffusion model, stage by stage, from captioned images.

1. VAE (``vae_stage``), 2. CLIP text encoder (``text_stage``), 3. U-Net (``unet_stage``),
4. export of RUN_DIR/model.safetensors in the original checkpoint layout.
With a base checkpoint (``fine_tune``) stages 1 and 2 are taken from it and stage 3 starts
from its U-Net.

A stage whose final weights exist in the run folder is skipped; an unfinished one continues
from RUN_DIR/<stage>/state with ``resume``.
"""

from __future__ import annotations

import time

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


def run_training(plan: TrainPlan) -> TrainOutcome:
    from ldm_cli.checkpoints.detect import is_upscaler_unet
    from ldm_cli.training import text_stage, unet_stage, vae_stage
    from ldm_cli.training.dataset import load_captioned_images
    from ldm_cli.training.loop import is_main_process, note, wait_for_everyone
    from ldm_cli.training.run_log import merge_json
    from ldm_cli.training.run_settings import data_fingerprint, path_key

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
    if plan.objective is not None:
        cfg = cfg.with_(prediction=plan.objective)
    data = load_captioned_images(plan.data_dir, cfg.default_size)
    train, heldout = split(data, plan.holdout, loop.seed)
    record = run_data(plan.data_dir, len(data), len(train), len(heldout))
    check_run_data(loop.run_dir, record, plan.base)
    if main:
        loop.run_dir.mkdir(parents=True, exist_ok=True)
        check_run_config(loop.run_dir / CONFIG_FILE, cfg)
        merge_json(loop.run_dir / METRICS_FILE, {"data": record})
        if base is not None:
            base.record(loop.run_dir)
    wait_for_everyone()
    # what else defines each stage's run: --resume with another is refused (run_settings)
    fingerprint = data_fingerprint(
        plan.data_dir, len(data), heldout=len(heldout), size=cfg.default_size
    )

    if base is not None:
        vae_model, text_model, init = base.vae, base.text_encoder, base.unet
    else:
        init = None
        if vae_stage.weights_path(loop).is_file():
            note(loop, f"vae: trained already ({vae_stage.weights_path(loop)}), skipped")
            vae = vae_stage.load_vae(cfg.vae, vae_stage.weights_path(loop))
        else:
            vae = vae_stage.train_vae(cfg.vae, train, heldout, plan.vae, loop, fingerprint)
            if vae is None:
                return TrainOutcome(None, read_metrics(loop))
        cfg, vae_model = cfg.with_(vae=vae.config), vae.vae

        if text_stage.weights_path(loop).is_file() and text_stage.tower_path(loop).is_file():
            note(loop, f"text: trained already ({text_stage.weights_path(loop)}), skipped")
            text_model = text_stage.load_text(cfg.text, loop).text_encoder
        else:
            text = text_stage.train_text(cfg.text, train, heldout, plan.text, loop, fingerprint)
            if text is None:
                return TrainOutcome(None, read_metrics(loop))
            text_model = text.text_encoder

    if unet_stage.weights_path(loop).is_file():
        note(loop, f"unet: trained already ({unet_stage.weights_path(loop)}), skipped")
        unet = unet_stage.load_unet(cfg, loop)
    else:
        unet = unet_stage.train_unet(
            cfg, vae_model, text_model, train, heldout, plan.unet, loop, init=init,
            fingerprint={**fingerprint, "base": path_key(plan.base)},
        )  # fmt: skip
        if unet is None:
            return TrainOutcome(None, read_metrics(loop))

    path = loop.run_dir / MODEL_FILE
    if main:
        model = unet_stage.assemble_model(cfg, unet.unet, vae_model, text_model)
        sizes = export_model(model, path, plan.export_dtype)
        minutes = round((time.perf_counter() - started) / 60, 2)
        merge_json(loop.run_dir / METRICS_FILE, {"export": {**sizes, "minutes_this_run": minutes}})
    wait_for_everyone()
    return TrainOutcome(path, read_metrics(loop))
