"""The LoRA and textual-inversion options shared by `ldm generate`, `img2img`, `inpaint` and
`outpaint` (see ldm_cli.networks.lora and ldm_cli.text.embeddings). torch is not imported here."""

from __future__ import annotations

from pathlib import Path

import typer

LORA = typer.Option(
    [],
    "--lora",
    help="A LoRA for every prompt: PATH[:WEIGHT] (kohya/A1111 or diffusers/PEFT file; weight 1 "
    "if omitted). Repeatable. Prompts can also name LoRAs with `<lora:NAME:WEIGHT>`.",
)
LORA_DIR = typer.Option(
    Path("models/Lora"),
    "--lora-dir",
    help="Where `<lora:NAME:WEIGHT>` in a prompt is looked up: NAME.safetensors (.pt, .ckpt) "
    "in this folder or below it.",
)
EMBEDDINGS = typer.Option(
    None,
    "--embeddings",
    help="Folder of textual-inversion embeddings (.pt, .safetensors); a prompt uses one by "
    "its file name.",
)


def configure(pipe, lora: list[str], lora_dir: Path, embeddings: Path | None) -> None:
    """Give the pipeline its LoRA folder, --lora files (read and checked now, before any
    rendering) and embeddings."""
    networks = pipe.networks
    networks.lora_dir = Path(lora_dir)
    for spec in lora:
        networks.add_lora(spec)
        tag = networks.loras[-1]
        networks.file(networks.path_of(tag))
    if embeddings is not None:
        networks.load_embeddings(embeddings)
