"""`--vae FILE`: a separate VAE loaded over a model's own, strictly, or a TAESD beside it."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.checkpoints.detect.vae_file import (
    VAEFileLayout,
    is_attention_projection,
    vae_file_layout,
)
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.checkpoints.pickled import PickledHeader, pickled_state
from ldm_cli.core.errors import UserError
from ldm_cli.models.loading import read_safetensors
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.ops.upsample_conv import FoldedUpsample


def read_vae_file(path: str | Path) -> tuple[CheckpointHeader, VAEFileLayout]:
    """The header and layout of a VAE file; a one-line error for anything else."""
    header = read_header(path)
    layout = vae_file_layout(header)
    if layout is None:
        raise UserError(
            f"--vae {header.path.name} is not a VAE file (neither the original encoder.*/"
            f"decoder.* layout, diffusers' AutoencoderKL, nor a TAESD; it holds e.g. "
            f"{next(iter(header.tensors), 'nothing')!r})"
        )
    return header, layout


def load_vae_weights(
    vae: AutoencoderKL, header: CheckpointHeader, layout: VAEFileLayout, model_name: str
) -> None:
    """Copy the file's weights into `vae` (kept in its dtype and device), every tensor
    matched by name and shape: a one-line error names what does not fit."""
    others = [k for k in header.tensors if not k.startswith(layout.prefix)]
    if others:
        raise UserError(
            f"--vae {header.path.name} is not a VAE file: it holds other tensors too "
            f"({_few(others)}; a whole checkpoint?)"
        )
    names = {}
    for key in header.tensors:
        original = layout.original_key(key)
        if original is not None:
            names[original] = key
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        what = f"lacks {_few(missing)}" if missing else f"has unused tensors {_few(unexpected)}"
        raise UserError(
            f"--vae {header.path.name} does not fit {model_name}'s VAE: the file {what}"
        )
    for original, key in names.items():
        shape = tuple(header.tensors[key].shape)
        want = tuple(expected[original].shape)
        if shape != want and not (is_attention_projection(original) and shape == want[:2]):
            raise UserError(
                f"--vae {header.path.name} does not fit {model_name}'s VAE: {key} is "
                f"{list(shape)}, the model's is {list(want)} (a VAE of another family?)"
            )
    state = _read(header, list(names.values()))
    weights = {o: state[k].reshape(expected[o].shape) for o, k in names.items()}
    with torch.no_grad():
        vae.load_state_dict(weights, strict=True)
    for module in vae.modules():  # kernels folded from the old weights (ops.upsample_conv)
        if isinstance(module, FoldedUpsample):
            module.folded.clear()


def _read(header: CheckpointHeader, keys: list[str]) -> dict[str, torch.Tensor]:
    cpu = torch.device("cpu")
    if isinstance(header, PickledHeader):  # --allow-pickle: weights-only unpickling
        return pickled_state(header, keys, cpu, None)
    return read_safetensors(header, keys, cpu, None)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
