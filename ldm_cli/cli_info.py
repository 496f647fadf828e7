"""`ldm info CKPT`."""

from __future__ import annotations

from pathlib import Path

import typer


def info(
    checkpoint: Path = typer.Argument(..., help="A single-file .safetensors checkpoint."),
) -> None:
    """Print a checkpoint's family, prediction type, dtypes and parameter counts."""
    from collections import Counter

    from .checkpoint_file import KNOWN_EXTRAS, read_header
    from .detect import FAMILY_NAMES, detect_config

    header = read_header(checkpoint)
    cfg = detect_config(header)
    components = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.",
    }
    print(f"file:        {header.path}")
    print(f"family:      {cfg.family} ({FAMILY_NAMES.get(cfg.family, cfg.family)})")
    print(f"prediction:  {cfg.prediction}")
    print(f"resolution:  {cfg.default_size}x{cfg.default_size}")
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
