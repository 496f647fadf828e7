"""`ldm train upscaler -o RUN_DIR`: the embedded super-resolution network (ldm-sr), trained on
images made offline (ldm_cli.training.sr_stage); torch is imported inside the command."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_seed

# The recipe of the shipped networks (weights/README.md); the same numbers as
# ldm_cli.training.sr_stage.RECIPE, which tests/training/test_sr_training.py checks.
SCALES = (2, 4)
STEPS = 6000
BATCH = 16
LR = 1e-3
LOW_SIDE = 32
FEATURES = 64
CONVS = 16


def train_upscaler(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: state, log, metrics.json and model.safetensors."
    ),
    scale: int = typer.Option(4, "--scale", help="2 or 4."),
    steps: int = typer.Option(STEPS, "--steps", help="Training steps."),
    batch_size: int = typer.Option(BATCH, "--batch-size", "-b", help="Pairs per step."),
    lr: float = typer.Option(LR, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    patch: int = typer.Option(LOW_SIDE, "--patch", help="Low-resolution patch side in pixels."),
    features: int = typer.Option(FEATURES, "--features", help="Channels of every convolution."),
    convs: int = typer.Option(CONVS, "--convs", help="Convolutions in the body."),
    images: list[Path] = typer.Option(
        [],
        "--images",
        help="A folder of your own images (PNG, JPEG, ...) to learn from beside the built-in "
        "ones; repeatable. They join the photos.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, images and batches."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from RUN_DIR/sr/state (the last --save-every, or where Ctrl-C stopped), "
        "with the settings the run was started with (a changed one is refused).",
    ),
    save_every: int = typer.Option(250, "--save-every", help="Save the state every N steps."),
    log_every: int = typer.Option(50, "--log-every", help="Log to train_log.jsonl every N."),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads (default: all available cores)."
    ),
    export_dtype: str = typer.Option(
        "fp16", "--export-dtype", help="fp16 or fp32 weights in model.safetensors."
    ),
) -> None:
    """Train a super-resolution network (Real-ESRGAN's compact layout) like the embedded one.

    It learns from what ships offline: scikit-image's sample photos (astronaut, chelsea,
    coffee, rocket and camera held out for the measurement), shapes scenes, procedural
    textures and text, shrunk as users shrink images (mostly bicubic, also other filters,
    blur, noise and JPEG). At the end the held-out photos are upscaled and compared with
    bicubic (PSNR, SSIM, colour shift), and RUN_DIR/model.safetensors is written; pass it to
    `ldm upscale --upscaler`.
    """
    from ldm_cli.cli.batch_resume import check_output_dir

    check_output_dir(out)
    check_seed(seed)
    if scale not in SCALES:
        raise UserError(f"--scale must be 2 or 4, got {scale}")
    for name, value, low in (
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--patch", patch, 8),
        ("--features", features, 4),
        ("--convs", convs, 1),
        ("--log-every", log_every, 1),
    ):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    if export_dtype not in ("fp16", "fp32"):
        raise UserError("--export-dtype must be fp16 or fp32")
    for folder in images:
        if not folder.is_dir():
            raise UserError(f"--images: not a folder: {folder}")

    from ldm_cli.models.sr_compact import CompactShape
    from ldm_cli.training.settings import LoopOptions, StageSettings
    from ldm_cli.training.sr_stage import SrPlan, train_sr

    plan = SrPlan(
        run_dir=out,
        shape=CompactShape(scale, features, convs),
        settings=StageSettings(steps, batch_size, lr, warmup=min(100, steps // 10 + 1),
                               weight_decay=0.0),
        loop=LoopOptions(
            run_dir=out, seed=seed, resume=resume, log_every=log_every,
            save_every=max(0, save_every), threads=threads,
        ),
        low_side=patch,
        extra_dirs=tuple(images),
        export_dtype=export_dtype,
    )  # fmt: skip
    metrics = train_sr(plan)
    if "export" not in metrics:
        print(f"stopped early; continue with --resume (state in {out})")
        return
    held = metrics["heldout_photos"]
    for name, row in held["images"].items():
        ours, bicubic = row["network"], row["bicubic"]
        print(
            f"{name:10s} PSNR {ours['psnr_db']:.2f} dB (bicubic {bicubic['psnr_db']:.2f}), "
            f"SSIM {ours['ssim']:.4f} ({bicubic['ssim']:.4f})"
        )
    print(
        f"mean gain over bicubic {held['mean_gain_db']:+.2f} dB, worst {held['worst_gain_db']:+.2f}"
    )
    print(f"model: {out / 'model.safetensors'} ({metrics['export']['file_mb']} MB)")
