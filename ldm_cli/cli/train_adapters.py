"""`ldm train lora` and `ldm train ti`: adapters trained on a folder of captioned images
(ldm_cli.training.lora_run, ti_run); torch is imported inside."""

from __future__ import annotations

from pathlib import Path

import typer

LORA_STEPS = 1000
LORA_LR = 1e-3
LORA_RANK = 8
TI_STEPS = 600
TI_LR = 5e-3
BATCH = 4

_DATA = typer.Argument(
    ...,
    help="Images with same-named .txt captions (kohya's layout; N_name subfolders repeat "
    "their images N times). Any size: resized and centre-cropped to the model's.",
)
_MODEL = typer.Option(
    None, "--model", "-m", help="The checkpoint to adapt (default: the embedded model)."
)
_SIZE = typer.Option(
    None, "--size", help="Training side in pixels (default: the model's; 512 for SD 1.5)."
)
_REPEATS = typer.Option(1, "--repeats", help="Times each image is seen per epoch.")
_SHUFFLE = typer.Option(
    False, "--shuffle-captions", help="Shuffle comma-separated caption parts every step."
)
_CAPTION_DROPOUT = typer.Option(
    0.0, "--caption-dropout", help="Fraction of examples trained on the empty caption."
)
_MIN_SNR = typer.Option(
    None, "--min-snr-gamma", help="Min-SNR loss weighting with this gamma (5 is usual)."
)
_NOISE_OFFSET = typer.Option(0.0, "--noise-offset", help="Offset noise (e.g. 0.05).")
_RESUME = typer.Option(
    False, "--resume", help="Continue from OUT's .train folder (same settings; checked)."
)
_SAVE_EVERY = typer.Option(100, "--save-every", help="Save the state every N steps.")
_SAMPLE_PROMPT = typer.Option(
    None, "--sample-prompt", help="Preview prompt (repeatable), rendered every --sample-every."
)
_SAMPLE_EVERY = typer.Option(
    0, "--sample-every", help="Preview every N steps into OUT.train/samples (0: at the end)."
)
_SAVE_DTYPE = typer.Option("fp32", "--save-dtype", help="fp32, fp16 or bf16 tensors.")
_THREADS = typer.Option(None, "--threads", help="CPU threads (default: all).")
_CHECKPOINTING = typer.Option(
    False, "--gradient-checkpointing", help="Recompute U-Net activations: less memory."
)
_MIXED_PRECISION = typer.Option(
    "no", "--mixed-precision", help="no, fp16 or bf16 (GPU; through accelerate)."
)
_BATCH = typer.Option(BATCH, "--batch-size", "-b", help="Images per step.")


def _common(
    data_dir, out, model, size, steps, batch_size, lr, seed, caption, name, repeats, shuffle,
    keep_tokens, caption_dropout, min_snr_gamma, noise_offset, resume, save_every,
    sample_prompt, sample_every, threads, mixed_precision, save_dtype, checkpointing,
):  # fmt: skip
    from ldm_cli.training.adapter_data import CaptionOptions
    from ldm_cli.training.adapter_job import AdapterJob
    from ldm_cli.training.adapter_stage import LossOptions

    return AdapterJob(
        data_dir=data_dir,
        out=out,
        model=model,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        size=size,
        captions=CaptionOptions(
            template=caption,
            name=name,
            repeats=repeats,
            shuffle=shuffle,
            keep_tokens=keep_tokens,
            dropout=caption_dropout,
        ),  # fmt: skip
        loss=LossOptions(min_snr_gamma=min_snr_gamma, noise_offset=noise_offset),
        resume=resume,
        save_every=save_every,
        sample_prompts=tuple(sample_prompt or ()),
        sample_every=sample_every,
        threads=threads,
        mixed_precision=mixed_precision,
        save_dtype=save_dtype,
        checkpointing=checkpointing,
    )


def train_lora(
    data_dir: Path = _DATA,
    out: Path = typer.Option(..., "--out", "-o", help="The LoRA file to write (.safetensors)."),
    model: Path | None = _MODEL,
    size: int | None = _SIZE,
    steps: int = typer.Option(LORA_STEPS, "--steps", help="Training steps."),
    rank: int = typer.Option(LORA_RANK, "--rank", help="LoRA rank (kohya's network_dim)."),
    alpha: float | None = typer.Option(
        None, "--alpha", help="LoRA alpha; the change is scaled by alpha/rank (default: rank)."
    ),
    lr: float = typer.Option(LORA_LR, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    batch_size: int = _BATCH,
    modules: str = typer.Option(
        "locon",
        "--modules",
        help="locon: the U-Net's transformer layers and convolutions (LoCon); attention: the "
        "transformer layers only (kohya's plain LoRA).",
    ),
    text_encoder: bool = typer.Option(
        True, "--text-encoder/--no-text-encoder", help="Train the text encoder's layers too."
    ),
    layout: str = typer.Option(
        "kohya", "--format", help="kohya (A1111, ComfyUI, kohya) or peft (diffusers' own)."
    ),
    caption: str | None = typer.Option(
        None, "--caption", help="Caption of images without a .txt ([filewords]: the .txt's)."
    ),
    repeats: int = _REPEATS,
    shuffle: bool = _SHUFFLE,
    keep_tokens: int = typer.Option(
        0, "--keep-tokens", help="With --shuffle-captions: leading parts kept in place."
    ),
    caption_dropout: float = _CAPTION_DROPOUT,
    min_snr_gamma: float | None = _MIN_SNR,
    noise_offset: float = _NOISE_OFFSET,
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, batches, noise."),
    resume: bool = _RESUME,
    save_every: int = _SAVE_EVERY,
    sample_prompt: list[str] | None = _SAMPLE_PROMPT,
    sample_every: int = _SAMPLE_EVERY,
    save_dtype: str = _SAVE_DTYPE,
    threads: int | None = _THREADS,
    checkpointing: bool = _CHECKPOINTING,
    mixed_precision: str = _MIXED_PRECISION,
) -> None:
    """Train a LoRA on DATA_DIR's images; write it as OUT (kohya's format by default).

    Load it with `ldm generate --lora OUT:1` or `<lora:NAME:1>` in a prompt, or in A1111,
    ComfyUI and diffusers. The run's state, log and previews live in OUT.train/ beside it;
    a killed run continues with --resume and ends with the same file, byte for byte.
    `accelerate launch -m ldm_cli train lora ...` trains on every GPU.
    """
    from ldm_cli.core.errors import UserError
    from ldm_cli.training.lora_network import FORMATS, LoraSpec
    from ldm_cli.training.lora_run import LoraJob
    from ldm_cli.training.lora_run import train_lora as run

    if layout not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {layout!r}")
    job = _common(
        data_dir, out, model, size, steps, batch_size, lr, seed, caption, out.stem, repeats,
        shuffle, keep_tokens, caption_dropout, min_snr_gamma, noise_offset, resume,
        save_every, sample_prompt, sample_every, threads, mixed_precision, save_dtype,
        checkpointing,
    )  # fmt: skip
    spec = LoraSpec(rank, float(rank if alpha is None else alpha), modules, text_encoder)
    summary = run(LoraJob(job, spec, layout))
    if summary is None:
        print(f"stopped early; continue with --resume (state in {job.run_dir})")
        return
    print(
        f"{out}: {summary['layers']} layers, {summary['parameters']:,} parameters, "
        f"{summary['file_kb']} KB, final loss {summary['final_loss']}"
    )


def train_ti(
    data_dir: Path = _DATA,
    token: str = typer.Option(
        ...,
        "--token",
        help="The new word: [name] in captions, the embedding's name (OUT: TOKEN.safetensors).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The embedding to write (.safetensors or A1111's .pt)."
    ),
    model: Path | None = _MODEL,
    size: int | None = _SIZE,
    steps: int = typer.Option(TI_STEPS, "--steps", help="Training steps."),
    lr: float = typer.Option(TI_LR, "--lr", help="Peak learning rate (AdamW, cosine decay)."),
    vectors: int = typer.Option(1, "--vectors", help="Vectors per token (A1111's default 1)."),
    init_word: str = typer.Option(
        "*", "--init-word", help="Start from this word's token embeddings (A1111: '*')."
    ),
    batch_size: int = _BATCH,
    caption: str | None = typer.Option(
        None, "--caption", help="Caption of images without a .txt, e.g. 'a photo of [name]'."
    ),
    repeats: int = _REPEATS,
    shuffle: bool = _SHUFFLE,
    keep_tokens: int = typer.Option(0, "--keep-tokens", help="Parts kept first when shuffling."),
    caption_dropout: float = _CAPTION_DROPOUT,
    min_snr_gamma: float | None = _MIN_SNR,
    noise_offset: float = _NOISE_OFFSET,
    seed: int = typer.Option(0, "--seed", help="Seed of batches and noise."),
    resume: bool = _RESUME,
    save_every: int = _SAVE_EVERY,
    sample_prompt: list[str] | None = _SAMPLE_PROMPT,
    sample_every: int = _SAMPLE_EVERY,
    save_dtype: str = _SAVE_DTYPE,
    threads: int | None = _THREADS,
    checkpointing: bool = _CHECKPOINTING,
    mixed_precision: str = _MIXED_PRECISION,
) -> None:
    """Train a textual-inversion embedding for TOKEN on DATA_DIR's images; write it as OUT.

    Use it by putting OUT in an --embeddings folder and TOKEN (OUT's file name) in a prompt;
    A1111 and diffusers' load_textual_inversion read it too. State, log and previews live in
    OUT.train/ beside it; --resume continues a killed run.
    """
    from ldm_cli.training.ti_run import TiJob
    from ldm_cli.training.ti_run import train_ti as run

    job = _common(
        data_dir, out, model, size, steps, batch_size, lr, seed, caption, token, repeats, shuffle,
        keep_tokens, caption_dropout, min_snr_gamma, noise_offset, resume, save_every,
        sample_prompt, sample_every, threads, mixed_precision, save_dtype, checkpointing,
    )  # fmt: skip
    summary = run(TiJob(job, token, init_word, vectors))
    if summary is None:
        print(f"stopped early; continue with --resume (state in {job.run_dir})")
        return
    print(f"{out}: {summary['vectors']} vector(s), final loss {summary['final_loss']}")
