"""The options of the flow models (FLUX.1, SD3/3.5) shared by `generate`, `img2img`,
`inpaint` and `outpaint`: their separate part files and FLUX dev's distilled guidance. torch is
not imported here."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError

VAE_FILE = typer.Option(
    None,
    "--vae",
    help="A separate VAE, used in place of the model's own and named in the PNG (A1111's "
    "'VAE hash', 'VAE'): the original encoder.*/decoder.* layout "
    "(vae-ft-mse-840000-ema-pruned, the SDXL fp16-fix VAE, FLUX's ae.safetensors) or "
    "diffusers' AutoencoderKL (a vae folder's diffusion_pytorch_model.safetensors). A TAESD "
    "file (taesd/taesdxl for SD 1.x/2.x/XL, taesd3/taef1 for SD3/FLUX: taesd_decoder.safetensors "
    "or diffusers' AutoencoderTiny) decodes instead of the VAE, about ten times faster, with "
    "softer detail: for drafts; images are still encoded with the model's VAE.",
)
CLIP_L_FILE = typer.Option(
    None,
    "--clip-l",
    help="FLUX/SD3: the CLIP-L text encoder file (clip_l.safetensors, text_model.*).",
)
CLIP_G_FILE = typer.Option(
    None,
    "--clip-g",
    help="SD3: the CLIP-G text encoder file (clip_g.safetensors, text_model.*).",
)
T5_FILE = typer.Option(
    None,
    "--t5",
    help="FLUX/SD3: the T5-XXL encoder file (t5xxl_fp16.safetensors, encoder.block.*); SD3 "
    "runs without one (zeros in its place, as diffusers does).",
)
GUIDANCE = typer.Option(
    None,
    "--guidance",
    help="FLUX dev: the distilled guidance the model takes as an input (default 3.5; one "
    "model call per step). --cfg above 1 adds a real unconditional pass on top.",
)


def part_files(vae: Path | None, clip_l: Path | None, clip_g: Path | None, t5: Path | None):
    """The load options of the part files given, each checked to exist."""
    given = {"vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    for name, path in given.items():
        if path is not None and not path.is_file():
            raise UserError(f"--{name.replace('_', '-')} file not found: {path}")
    return tuple((name, path) for name, path in given.items() if path is not None)
