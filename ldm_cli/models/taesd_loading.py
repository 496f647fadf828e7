"""Load a TAESD file (madebyollin's decoder or encoder file, or diffusers' AutoencoderTiny)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm_cli.checkpoints.detect.taesd import TAESDPart, taesd_layout
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.checkpoints.pickled import PickledHeader, pickled_state
from ldm_cli.core.errors import UserError
from ldm_cli.models.loading import SkipMetaInit, key_problems, read_safetensors
from ldm_cli.models.taesd import TAESDConfig, TinyAutoencoder


def load_tiny_autoencoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> TinyAutoencoder:
    """The TAESD in `path` with whichever parts the file holds, strictly loaded; `dtype` None
    keeps the file's."""
    header = read_header(path)
    layout = taesd_layout(header)
    if layout is None:
        raise UserError(
            f"{header.path.name} is not a TAESD tiny autoencoder (neither a taesd_decoder/"
            f"taesd_encoder file nor diffusers' AutoencoderTiny; it holds e.g. "
            f"{next(iter(header.tensors))!r})"
        )
    config = TAESDConfig(latent_channels=layout.latent_channels, name=header.path.name)
    with torch.device("meta"), SkipMetaInit():
        model = TinyAutoencoder(
            config, has_encoder=layout.encoder is not None, has_decoder=layout.decoder is not None
        )
    device = torch.device(device)
    if model.encoder is not None:
        _load_part(model.encoder, "encoder", layout.encoder, header, device, dtype)
    if model.decoder is not None:
        _load_part(model.decoder, "decoder", layout.decoder, header, device, dtype)
    model.requires_grad_(False)
    return model.eval()


def _load_part(
    module: nn.Module,
    name: str,
    part: TAESDPart,
    header: CheckpointHeader,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    expected = {part.file_key(k): tuple(v.shape) for k, v in module.state_dict().items()}
    present = [k for k in header.tensors if k.startswith(part.prefix)]
    missing = sorted(set(expected) - set(present))
    problems = key_problems(expected, header, present, missing)
    if problems:
        raise UserError(f"{header.path.name} does not hold a TAESD {name}: " + "; ".join(problems))
    if isinstance(header, PickledHeader):  # --allow-pickle: madebyollin's .pth files
        state = pickled_state(header, present, device, dtype)
    else:
        state = read_safetensors(header, present, device, dtype)
    module.load_state_dict(
        {part.module_key(k): t for k, t in state.items()}, strict=True, assign=True
    )
