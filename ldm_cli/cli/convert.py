"""`ldm convert IN OUT`: pickles to .safetensors, dtypes, pruning, diffusers folders, a VAE and
LoRAs baked in (ldm_cli.checkpoint_tools.convert). torch is imported inside the command only."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

DTYPE_HELP = (
    "Cast the floating-point tensors to fp32, fp16 or bf16 (integer and bool tensors are kept; "
    "default: every tensor as it is). The VAE is cast too: the SDXL VAE overflows when it "
    "decodes in fp16 (black or NaN images in tools that run it in fp16): keep such a file in "
    "fp32/bf16 or bake in the fp16-fix VAE with --vae."
)
PRUNE_HELP = (
    "Drop what only training uses: the EMA copy of the U-Net (model_ema.*; the trained "
    "weights, which A1111, ComfyUI, diffusers and ldm load, are kept, so the image does not "
    "change), loss tensors (loss.*) and the loss weights logvar and lvlb_weights. The noise "
    "schedule buffers, v_pred/ztsnr markers and CLIP's position_ids are kept."
)
EMA_HELP = (
    "Use the EMA weights (model_ema.*) in place of the U-Net's trained ones, as the "
    "'-emaonly' releases were made (changes the image); the EMA copy is then dropped."
)
VAE_HELP = (
    "Bake this VAE into the checkpoint in place of its own: the original encoder.*/decoder.* "
    "layout or diffusers' AutoencoderKL, as --vae of `ldm generate` reads it (the baked file "
    "makes the same image). TAESD files are refused. Its tensors take the checkpoint's dtype "
    "(or --dtype)."
)
LORA_HELP = (
    "Merge a LoRA into the weights, FILE:W (weight 1 if omitted), as A1111's 'merge LoRA into "
    "checkpoint'; repeatable, applied in order. LoRA/LoCon (kohya, diffusers/PEFT), LyCORIS "
    "LoHa/LoKr and DoRA, as --lora of `ldm generate` reads them (the baked file makes the image "
    "`--lora FILE:W` makes)."
)


def convert(
    source: Path = typer.Argument(..., metavar="IN", help="Checkpoint file or diffusers folder."),
    out: Path = typer.Argument(..., metavar="OUT", help="New .safetensors file or folder."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="fp32|fp16|bf16", help=DTYPE_HELP),
    prune: bool = typer.Option(False, "--prune", help=PRUNE_HELP),
    ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
    vae: Path | None = typer.Option(None, "--vae", metavar="FILE", help=VAE_HELP),
    lora: list[str] = typer.Option([], "--lora", metavar="FILE:W", help=LORA_HELP),
) -> None:
    """Rewrite a checkpoint as a .safetensors file (or a diffusers folder).

    IN is a .safetensors file, a pickled .ckpt/.pt/.pth/.bin or a diffusers folder (SD 1.x/2.x/XL).
    Pickles need no --allow-pickle here: turning the pickles people were given into .safetensors is
    what this command is for, and they are read with torch's weights-only unpickler, which builds
    tensors and plain values only, so no code in the file runs (a pickle that calls anything else is
    refused). OUT ending in .safetensors is one file in the original key layout; any other name is
    written as a diffusers folder. OUT must not exist: nothing is ever overwritten, and the file
    appears only once it is complete. What was done (source and its hash, dtype, pruning, VAE,
    LoRAs) is recorded in the file's metadata under ldm_convert."""
    check_dtype(dtype)
    check_input(source, "IN")
    check_new_output(out)
    if vae is not None:
        check_input(vae, "--vae", folder=False)
    loras = tuple(lora_spec(spec) for spec in lora)
    from ldm_cli.checkpoint_tools.convert import ConvertJob, run_convert

    job = ConvertJob(source, out, dtype, prune, ema, vae, loras)
    print(run_convert(job))


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"unknown --dtype {dtype!r}; use fp32, fp16 or bf16")


def check_input(path: Path, what: str, folder: bool = True) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_dir() and not folder:
        raise UserError(f"{what} {path} is a folder; give the file")


def check_new_output(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} exists already; give a new name (nothing is overwritten)")
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{out.name}: ldm writes .safetensors files (or diffusers folders), not pickles"
        )
    if not out.parent.is_dir():
        raise UserError(f"the folder of {out} does not exist")


def lora_spec(text: str) -> tuple[Path, float]:
    """--lora FILE[:W] -> (file, weight); a one-line error for a bad weight or missing file."""
    from ldm_cli.networks.tags import parse_lora_option

    tag = parse_lora_option(text)
    if tag.path is None or not tag.path.is_file():
        raise UserError(f"--lora {text}: LoRA file {tag.path} not found")
    return tag.path, tag.unet
