"""`ldm train controlnet DATA_DIR -o RUN_DIR`: a ControlNet for a model, trained on captioned
images and their control maps (ldm_cli.training.controlnet_stage); torch is imported inside."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_seed

STEPS = 3000
BATCH = 32
LR = 1e-4


def train_controlnet(
    data_dir: Path = typer.Argument(
        ..., help="Images with same-named .txt captions (or metadata.jsonl), as `ldm train model`."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: state, log, samples, metrics.json, model.safetensors."
    ),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="The model to control (default: the embedded model)."
    ),
    preprocess: str = typer.Option(
        "canny",
        "--preprocess",
        help="The control maps made from the images: canny, threshold, "
        "scribble, invert (see `ldm preprocess --help`).",
    ),
    steps: int = typer.Option(STEPS, "--steps", help="Training steps."),
    batch_size: int = typer.Option(BATCH, "--batch-size", "-b", help="Images per step."),
    lr: float = typer.Option(LR, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    holdout: int | None = typer.Option(
        None, "--holdout", help="Images kept out of training for the samples (default 5%)."
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Start from this ControlNet (same model) instead of the encoder copy."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and batches."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from RUN_DIR's saved state (the last --save-every, or where Ctrl-C "
        "stopped), with the settings the run was started with (a changed one is refused).",
    ),
    save_every: int = typer.Option(250, "--save-every", help="Save the state every N steps."),
    sample_every: int = typer.Option(
        0, "--sample-every", help="Write samples every N steps (0: at the end only)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all)."),
    export_dtype: str = typer.Option("fp16", "--export-dtype", help="fp16 or fp32."),
) -> None:
    """Train a ControlNet for a model on DATA_DIR and control maps made from its images.

    The model stays frozen; the ControlNet starts as a copy of its U-Net's encoder whose
    outputs are zero. RUN_DIR/model.safetensors is written in the original ControlNet layout:
    pass it to `ldm generate --control`. The embedded ControlNet
    (weights/ldm-shapes-canny.safetensors) was made with the defaults on the shapes data.
    """
    from ldm_cli.cli.batch_resume import check_output_dir
    from ldm_cli.control.preprocessors import PREPROCESSORS

    if not resume:
        check_output_dir(out)
        if (out / "model.safetensors").exists():
            raise UserError(f"{out} holds a finished run (model.safetensors); use a new --out")
        if (out / "controlnet" / "state").exists():
            raise UserError(f"{out} holds an unfinished run; pass --resume to continue it")
    check_seed(seed)
    if not data_dir.is_dir():
        raise UserError(f"not a folder: {data_dir}")
    if preprocess not in PREPROCESSORS or preprocess == "none":
        names = ", ".join(p for p in PREPROCESSORS if p != "none")
        raise UserError(f"--preprocess must be one of {names}, got {preprocess!r}")
    for name, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    if export_dtype not in ("fp16", "fp32"):
        raise UserError("--export-dtype must be fp16 or fp32")
    from ldm_cli.core.embedded import default_model_path

    base = model or default_model_path()
    if not Path(base).is_file():
        raise UserError(f"checkpoint not found: {base}")
    if init is not None and not init.is_file():
        raise UserError(f"--init: not found: {init}")

    from ldm_cli.training.controlnet_stage import ControlNetPlan
    from ldm_cli.training.controlnet_stage import train_controlnet as train
    from ldm_cli.training.settings import LoopOptions, StageSettings

    plan = ControlNetPlan(
        data_dir=data_dir,
        base=Path(base),
        preprocess=preprocess,
        settings=StageSettings(steps, batch_size, lr, warmup=min(100, steps // 10 + 1)),
        loop=LoopOptions(
            run_dir=out, seed=seed, resume=resume, save_every=max(0, save_every),
            sample_every=max(0, sample_every), threads=threads,
        ),
        holdout=holdout,
        export_dtype=export_dtype,
        init=init,
    )  # fmt: skip
    metrics = train(plan)
    if not metrics:
        print(f"stopped early; continue with --resume (state in {out})")
        return
    print(f"final loss {metrics['final_loss']}, {metrics['parameters']:,} parameters")
    print(f"model: {out / 'model.safetensors'} ({metrics['file_mb']} MB)")
