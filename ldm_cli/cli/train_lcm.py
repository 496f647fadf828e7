"""`ldm train lcm DATA_DIR -o NAME.safetensors`: an LCM-LoRA for a model, distilled from the
model itself (ldm_cli.training.lcm_distill); torch is imported inside."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.cli.train_adapters import (
    _BATCH,
    _CHECKPOINTING,
    _DATA,
    _MIXED_PRECISION,
    _MODEL,
    _RESUME,
    _SAVE_DTYPE,
    _SAVE_EVERY,
    _SIZE,
    _THREADS,
    _common,
)

LCM_STEPS = 1000
LCM_LR = 5e-4
LCM_RANK = 16


def train_lcm(
    data_dir: Path = _DATA,
    out: Path = typer.Option(..., "--out", "-o", help="The LCM-LoRA file to write."),
    model: Path | None = _MODEL,
    size: int | None = _SIZE,
    steps: int = typer.Option(LCM_STEPS, "--steps", help="Training steps."),
    rank: int = typer.Option(LCM_RANK, "--rank", help="LoRA rank (kohya's network_dim)."),
    lr: float = typer.Option(LCM_LR, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    cfg: float | None = typer.Option(
        None,
        "--cfg",
        help="The guidance scale the LoRA bakes in: the teacher's classifier-free guidance "
        "(default: the model's own). The distilled model then runs at --cfg 1.",
    ),
    batch_size: int = _BATCH,
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, batches, noise."),
    resume: bool = _RESUME,
    save_every: int = _SAVE_EVERY,
    save_dtype: str = _SAVE_DTYPE,
    threads: int | None = _THREADS,
    checkpointing: bool = _CHECKPOINTING,
    mixed_precision: str = _MIXED_PRECISION,
) -> None:
    """Distil a model into an LCM-LoRA: with it, the model draws in 2 to 8 steps.

    Use it as `ldm generate PROMPT --lora OUT --sampler lcm --steps 4 --cfg 1`. The model is its
    own teacher (latent consistency distillation with guided DDIM steps of 20 timesteps, as
    diffusers' LCM-LoRA scripts); DATA_DIR is a folder of captioned images as for `ldm train
    lora` (the captions are the prompts distilled). OUT is in kohya's format; OUT.train/ holds
    the state, and --resume continues a killed run.
    """
    from ldm_cli.training.lcm_distill import DistillOptions
    from ldm_cli.training.lcm_distill import train_lcm as run
    from ldm_cli.training.lora_network import LoraSpec
    from ldm_cli.training.lora_run import LoraJob

    job = _common(
        data_dir, out, model, size, steps, batch_size, lr, seed, None, out.stem, 1, False, 0,
        0.0, None, 0.0, resume, save_every, None, 0, threads, mixed_precision, save_dtype,
        checkpointing,
    )  # fmt: skip
    spec = LoraSpec(rank, float(rank), "locon", text_encoder=False)
    summary = run(LoraJob(job, spec), DistillOptions(cfg))
    if summary is None:
        print(f"stopped early; continue with --resume (state in {job.run_dir})")
        return
    print(
        f"{out}: {summary['layers']} layers, {summary['parameters']:,} parameters, "
        f"{summary['file_kb']} KB, teacher cfg {summary['cfg']:g}, "
        f"final loss {summary['final_loss']}; use --sampler lcm --steps 4 --cfg 1"
    )
