"""`ldm info CKPT`."""

from __future__ import annotations

from pathlib import Path

import typer


def info(
    checkpoint: Path = typer.Argument(..., help="A single-file .safetensors checkpoint."),
    prediction: str | None = typer.Option(
        None,
        "--prediction",
        help="Report this prediction type (eps or v) instead of detecting it; without it an "
        "SD 2.x file with no v_pred tensor is loaded and probed (one U-Net call).",
    ),
) -> None:
    """Print a checkpoint's family, prediction type, dtypes and parameter counts."""
    from collections import Counter

    from ldm_cli.checkpoints.detect import FAMILY_NAMES, detect_config
    from ldm_cli.checkpoints.file import read_header
    from ldm_cli.checkpoints.header import KNOWN_EXTRAS
    from ldm_cli.core.config import ModelConfig

    header = read_header(checkpoint)
    if not any(
        k.startswith(("model.", "first_stage_model.", "conditioner.")) for k in header.tensors
    ):
        from ldm_cli.core.errors import UserError

        try:
            return _upscaler_info(checkpoint)
        except UserError:
            pass  # neither: detect_config names what the file lacks
    cfg = detect_config(header)
    cfg, how = _prediction(cfg, header, prediction)
    components = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.",
    }
    if cfg.conditioner:  # SDXL: conditioner.embedders.N, one line per text encoder
        del components["text_encoder"]
        for index in range(len(cfg.text_encoders)):
            name = "text_encoder" + (f"_{index + 1}" if index else "")
            components[name] = f"conditioner.embedders.{index}."
    print(f"file:        {header.path}")
    print(f"family:      {cfg.family} ({FAMILY_NAMES.get(cfg.family, cfg.family)})")
    print(f"prediction:  {cfg.prediction}{how}")
    print(f"resolution:  {cfg.default_size}x{cfg.default_size}")
    if cfg.default_cfg != ModelConfig.default_cfg:  # named in the file's ldm_config
        print(f"guidance:    {cfg.default_cfg:g} by default")
    # which text layer the U-Net reads; 1 = the last (SDXL: every tower, before its final norm)
    towers = " (every text encoder)" if len(cfg.text_encoders) > 1 else ""
    print(f"clip skip:   {cfg.text.clip_skip}{towers}")
    print(f"tensors:     {len(header.tensors)}")
    for name, prefix in components.items():
        infos = [
            t
            for k, t in header.tensors.items()
            if k.startswith(prefix) and not KNOWN_EXTRAS.match(k)
        ]
        count = sum(_numel(t.shape) for t in infos)
        dtypes = Counter(t.dtype for t in infos)
        kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
        print(f"{name + ':':<13}{count:>14,} parameters  ({kinds})")
    other = [k for k in header.tensors if not any(k.startswith(p) for p in components.values())]
    if other:
        print(f"other:       {len(other)} tensors (e.g. {other[0]})")


def _prediction(cfg, header, override: str | None):
    """(`cfg` with its prediction type settled, a note on how when not read from the file);
    a UserError where the file's tensors do not make the detected model."""
    from ldm_cli.checkpoints.prediction import check_prediction, settled_prediction, with_prediction
    from ldm_cli.models.loading import checked_architecture, load_model

    check_prediction(override)
    if override is not None or settled_prediction(cfg, header) is not None:
        # the tensors must make the model, with the same one-line error as `ldm generate`
        checked_architecture(header, cfg)
        if override is None:
            return cfg, ""
        return with_prediction(cfg, header, override), " (--prediction)"
    # the probe loads the model, which checks its tensors
    from ldm_cli.models.prediction_probe import probe_prediction

    model, _ = load_model(header, cfg=cfg)
    found = probe_prediction(model.unet)
    return with_prediction(cfg, header, found), " (probed: U-Net output at t=999)"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _upscaler_info(path: Path) -> None:
    """An image upscaler file (ldm-sr, ESRGAN, ...): its architecture, scale and size."""
    from ldm_cli.pipeline.tasks.image_upscaler import file_metadata, load_upscaler

    upscaler = load_upscaler(path, "cpu")
    params = list(upscaler.module.parameters())
    print(f"file:        {path}")
    print(f"family:      image upscaler ({upscaler.architecture}, x{upscaler.scale})")
    print(f"parameters:  {sum(p.numel() for p in params):,}")
    print(f"tensors:     {len(upscaler.module.state_dict())}")
    heldout = file_metadata(path).get("heldout_photos")
    if heldout:
        print(
            f"trained:     held-out photos {heldout['mean_gain_db']:+.2f} dB PSNR over bicubic "
            f"on average, {heldout['worst_gain_db']:+.2f} dB on the worst"
        )
    print(f"use:         ldm upscale IMAGE --upscaler {path}")
