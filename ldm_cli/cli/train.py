"""`ldm train DATA_DIR --out RUN_DIR`: train a latent diffusion model from captioned images."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_seed
from ldm_cli.training import embedded_config as recipe

MIXED_PRECISION = ("no", "fp16", "bf16")


def train(
    data_dir: Path = typer.Argument(
        ..., help="Image folder: a .txt caption beside each image, or metadata.jsonl."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: stage states, samples, logs and model.safetensors."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help=f"Architecture: {', '.join(recipe.CONFIGS)}, or a ModelConfig .json file "
        "(default: embedded, or with --base the base's own).",
    ),
    size: int | None = typer.Option(
        None,
        "--size",
        help="Training image side in pixels (default: the config's; 64 for embedded). Images "
        "are cropped to squares, never enlarged: at most the smallest image's shorter side.",
    ),
    vae_steps: int = typer.Option(recipe.VAE_STEPS, "--vae-steps", help="VAE training steps."),
    text_steps: int = typer.Option(
        recipe.TEXT_STEPS, "--text-steps", help="Text encoder (CLIP) training steps."
    ),
    unet_steps: int = typer.Option(recipe.UNET_STEPS, "--unet-steps", help="U-Net steps."),
    batch_size: int = typer.Option(
        recipe.UNET_BATCH, "--batch-size", "-b", help="U-Net batch size (per process)."
    ),
    text_batch_size: int = typer.Option(
        recipe.TEXT_BATCH, "--text-batch-size", help="CLIP batch size (its negatives, too)."
    ),
    vae_batch_size: int = typer.Option(
        recipe.VAE_BATCH, "--vae-batch-size", help="VAE batch size (random crops)."
    ),
    lr: float = typer.Option(recipe.UNET_LR, "--lr", help="U-Net peak learning rate."),
    text_lr: float = typer.Option(recipe.TEXT_LR, "--text-lr", help="CLIP peak learning rate."),
    vae_lr: float = typer.Option(recipe.VAE_LR, "--vae-lr", help="VAE peak learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, batches and noise."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue unfinished stages from RUN_DIR/<stage>/state: the last --save-every "
        "state, or the step a Ctrl-C stopped at (after a kill, the steps since the last save are "
        "run again). Give the settings the run was started with: a changed one (steps, batch "
        "size, lr, seed, data, --size, ...) is refused, naming it.",
    ),
    sample_every: int = typer.Option(
        500, "--sample-every", help="Write samples to RUN_DIR/samples every N steps (0: at end)."
    ),
    save_every: int = typer.Option(
        250,
        "--save-every",
        help="Save the resumable state every N steps (a killed run loses the steps since; "
        "Ctrl-C saves the state before it ends).",
    ),
    log_every: int = typer.Option(
        25, "--log-every", help="Log loss, lr and it/s to train_log.jsonl every N steps."
    ),
    mixed_precision: str = typer.Option(
        "no", "--mixed-precision", help="no, fp16 or bf16 (GPU; no gain on most CPUs)."
    ),
    export_dtype: str = typer.Option(
        "fp32", "--export-dtype", help="fp32 or fp16 weights in model.safetensors."
    ),
    holdout: int | None = typer.Option(
        None, "--holdout", help="Images held out for PSNR/retrieval metrics (default: 5%)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads per process (default: all available cores)."
    ),
    sides: str | None = typer.Option(
        None,
        "--sides",
        help="x4 upscaler configs: image sides to train at in turn, e.g. 64,128,256 (the first "
        "is --size; larger ones use as many images as hold the first's pixels, and batches of "
        "as many pixels), so the model learns its domain at every scale.",
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="x4 upscaler configs: start the U-Net from this x4 checkpoint's (a fine-tune).",
    ),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="What the U-Net learns: eps or v (noise prediction, the config's or the base's "
        "own by default), or flow (rectified flow: the velocity noise - x0 along straight "
        "paths, as SD3 and FLUX; sampled with euler, euler_a, heun, dpm2 or lms). With --base "
        "an eps model's U-Net is fine-tuned to the new objective.",
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Build on this checkpoint: its VAE and text encoder are used frozen instead of "
        "trained, and a text-to-image config fine-tunes its U-Net (modules the config adds "
        "start as identities). x4 upscaler configs (embedded-x4) default to the embedded model.",
    ),
) -> None:
    """Train the whole model stage by stage: VAE, CLIP text encoder, U-Net, then export.

    With --base CKPT the VAE and text encoder are the checkpoint's, frozen, and the U-Net is
    fine-tuned from its own (--config: the checkpoint's architecture unless named).

    Each stage is skipped when its weights are already in RUN_DIR; with --resume an
    interrupted stage continues where its last saved state left off (Ctrl-C saves one). A run
    folder belongs to one data folder: another DATA_DIR needs a new --out. Works unchanged under
    `accelerate launch`. An x4 upscaler config (--config embedded-x4) trains only its U-Net,
    on 1/4-size bicubic copies of the images, with --unet-steps, --batch-size and --lr.
    """
    from ldm_cli.checkpoints.detect import is_upscaler_unet
    from ldm_cli.cli.batch_resume import check_output_dir
    from ldm_cli.training.model_run import run_training
    from ldm_cli.training.plan import EXPORT_DTYPES, TrainPlan
    from ldm_cli.training.settings import LoopOptions, StageSettings

    check_output_dir(out)  # the run folder, before anything is read or trained
    check_seed(seed)
    cfg = training_config(config, base)
    size = size or cfg.default_size
    multiple = cfg.vae.downscale * 2 ** (len(cfg.unet.channel_mult) - 1)
    if size < 8 or size % multiple:
        raise UserError(f"--size must be a positive multiple of {multiple} for this config")
    _check_at_least_one(
        ("--vae-steps", vae_steps), ("--text-steps", text_steps), ("--unet-steps", unet_steps),
        ("--batch-size", batch_size), ("--text-batch-size", text_batch_size),
        ("--vae-batch-size", vae_batch_size), ("--log-every", log_every),
    )  # fmt: skip
    if text_batch_size < 2:
        raise UserError("--text-batch-size must be at least 2 (contrastive negatives)")
    for name, value in (("--lr", lr), ("--text-lr", text_lr), ("--vae-lr", vae_lr)):
        if not value > 0:
            raise UserError(f"{name} must be positive, got {value}")
    if objective not in (None, "eps", "v", "flow"):
        raise UserError(f"--objective must be eps, v or flow, got {objective!r}")
    if objective is not None and is_upscaler_unet(cfg.unet):
        raise UserError("--objective is for text-to-image configs, not x4 upscalers")
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if export_dtype not in EXPORT_DTYPES:
        raise UserError(f"--export-dtype must be one of {', '.join(EXPORT_DTYPES)}")

    side_list = _sides(sides, size, multiple)
    if (side_list or init) and not is_upscaler_unet(cfg.unet):
        raise UserError("--sides and --init are for x4 upscaler configs (--config embedded-x4)")
    if init is not None and not init.is_file():
        raise UserError(f"--init: checkpoint not found: {init}")
    _check_base(cfg, config, base)
    from ldm_cli.training.dataset import check_image_sides

    largest = side_list[-1] if side_list else size
    check_image_sides(data_dir, largest, "--sides" if side_list else "--size")
    plan = TrainPlan(
        data_dir=data_dir,
        config=cfg.with_(default_size=size),
        vae=StageSettings(vae_steps, vae_batch_size, vae_lr, warmup=_warmup(vae_steps)),
        text=StageSettings(text_steps, text_batch_size, text_lr, warmup=_warmup(text_steps)),
        unet=StageSettings(unet_steps, batch_size, lr, warmup=_warmup(unet_steps)),
        loop=LoopOptions(
            run_dir=out,
            seed=seed,
            resume=resume,
            mixed_precision=mixed_precision,
            log_every=log_every,
            save_every=max(0, save_every),
            sample_every=max(0, sample_every),
            threads=threads,
        ),
        holdout=holdout,
        export_dtype=export_dtype,
        base=base,
        sides=side_list,
        init=init,
        objective=objective,
    )
    _report(run_training(plan), out)


def _check_base(cfg, config: str | None, base: Path | None) -> None:
    """--base against --config, from the checkpoint's header, before anything is loaded."""
    from ldm_cli.checkpoints.detect import is_upscaler_unet

    if base is None or (config is None and not is_upscaler_unet(cfg.unet)):
        return  # no base, or the base's own architecture
    if not base.is_file():
        raise UserError(f"--base {base}: no such file")
    if is_upscaler_unet(cfg.unet):
        from ldm_cli.checkpoints.detect import detect_config
        from ldm_cli.checkpoints.file import read_header
        from ldm_cli.training.upscaler_run import upscaler_config

        upscaler_config(cfg, detect_config(read_header(base)))
        return
    from ldm_cli.training.fine_tune import check_base_fits

    check_base_fits(cfg, base, config)


def _check_at_least_one(*values: tuple[str, int]) -> None:
    for name, value in values:
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")


def _report(outcome, out: Path) -> None:
    """What the run measured, and where the model is (or how to continue)."""
    metrics = outcome.metrics
    if "psnr_db" in metrics.get("vae", {}):
        print(f"VAE:   held-out PSNR {metrics['vae']['psnr_db']} dB")
    if "retrieval_top1" in metrics.get("text", {}):
        print(f"CLIP:  held-out top-1 retrieval {metrics['text']['retrieval_top1']:.1%}")
    if "psnr_db" in metrics.get("upscaler_eval", {}):
        e = metrics["upscaler_eval"]
        print(
            f"x4:    held-out PSNR {e['psnr_db']} dB with the captions as prompts, "
            f"{e.get('psnr_no_prompt_db', '-')} dB without (bicubic {e['bicubic_psnr_db']} dB)"
        )
    if outcome.model_path is None:
        print(f"stopped early; continue with --resume (state in {out})")
    else:
        print(f"model: {outcome.model_path} ({metrics['export']['file_mb']} MB)")


def _sides(text: str | None, size: int, multiple: int) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--sides takes comma-separated whole numbers, got {text!r}") from None
    if sides[0] != size or sorted(set(sides)) != list(sides):
        raise UserError(f"--sides must start at --size ({size}) and grow, got {text}")
    if any(side % multiple for side in sides):
        raise UserError(f"--sides must be multiples of {multiple} for this config")
    return sides


def _warmup(steps: int) -> int:
    return max(1, min(200, steps // 10))


def training_config(name: str | None, base: Path | None):
    """--config by name or file; without it the embedded architecture, or the --base
    checkpoint's own when fine-tuning one."""
    if name is not None:
        return recipe.training_config(name)
    if base is None:
        return recipe.EMBEDDED
    from ldm_cli.checkpoints.detect import detect_config, is_upscaler_unet
    from ldm_cli.checkpoints.file import read_header

    if not base.is_file():
        raise UserError(f"--base {base}: no such file")
    cfg = detect_config(read_header(base))
    if is_upscaler_unet(cfg.unet):
        raise UserError(
            "--base is an x4 upscaler; fine-tuning one is not supported (to train a new upscaler "
            "around a text-to-image model's VAE, pass --config embedded-x4)"
        )
    return cfg
