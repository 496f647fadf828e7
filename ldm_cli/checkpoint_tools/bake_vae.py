"""`ldm convert --vae FILE`: a separate VAE written over a checkpoint's own.

The VAE file is read as `--vae` reads it at generate time (models.vae_file: the original
``encoder.*``/``decoder.*`` layout bare or under ``first_stage_model.``/``vae.``, or diffusers'
AutoencoderKL renamed to the original names), so the baked checkpoint makes the image that
`--vae FILE` makes. Every VAE tensor of the checkpoint must be replaced, each by one of the same
shape (diffusers' linear attention projections take the 1x1-convolution shape); a TAESD file is
refused (it decodes beside a VAE, it is not one).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ldm_cli.checkpoint_tools.prune import TRAINING_ONLY
from ldm_cli.checkpoint_tools.sources import Source, open_source
from ldm_cli.core.errors import UserError

VAE_ROOT = "first_stage_model."


@contextlib.contextmanager
def vae_tensors(path: Path, checkpoint: Source):
    """While the block runs: checkpoint key -> a reader of the VAE file's tensor for it, in the
    checkpoint's shape."""
    from ldm_cli.checkpoints.detect.vae_file import is_attention_projection, vae_file_layout

    with open_source(path, "--vae") as vae:
        layout = vae_file_layout(vae.header())
        if layout is None:
            raise UserError(
                f"--vae {vae.name} is not a VAE file (neither the original encoder.*/decoder.* "
                f"layout nor diffusers' AutoencoderKL; it holds e.g. {next(iter(vae.tensors))!r})"
            )
        if layout.kind == "taesd":
            raise UserError(
                f"--vae {vae.name} is a TAESD (a tiny decoder used beside the VAE); it cannot "
                "be baked into a checkpoint"
            )
        others = [k for k in vae.tensors if not k.startswith(layout.prefix)]
        if others:
            raise UserError(
                f"--vae {vae.name} is not a VAE file: it holds other tensors too ({others[0]}, "
                "...; a whole checkpoint?)"
            )
        wanted = {
            k for k in checkpoint.tensors if k.startswith(VAE_ROOT) and not TRAINING_ONLY.match(k)
        }
        if not wanted:
            raise UserError(f"{checkpoint.name} has no VAE (no {VAE_ROOT}* tensors) to replace")
        found = {}
        for key, (_, shape) in vae.tensors.items():
            original = layout.original_key(key)
            if original is None:
                continue
            target = VAE_ROOT + original
            if target not in wanted:
                raise UserError(
                    f"--vae {vae.name} does not fit {checkpoint.name}: its {key} has no place "
                    "in the checkpoint's VAE"
                )
            want = checkpoint.tensors[target][1]
            fits = shape == want or (is_attention_projection(original) and shape == want[:2])
            if not fits:
                raise UserError(
                    f"--vae {vae.name} does not fit {checkpoint.name}: {key} is {list(shape)}, "
                    f"the checkpoint's is {list(want)} (a VAE of another family?)"
                )
            found[target] = _reader(vae, key, want)
        missing = sorted(wanted - set(found))
        if missing:
            raise UserError(
                f"--vae {vae.name} does not fit {checkpoint.name}: it lacks {missing[0]} "
                f"({len(missing)} tensors of the checkpoint's VAE)"
            )
        yield found


def _reader(vae: Source, key: str, shape: tuple[int, ...]):
    def read() -> torch.Tensor:
        return vae.read(key).reshape(shape)

    return read
