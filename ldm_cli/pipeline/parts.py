"""What the render path's helper modules read of a loaded pipeline: an interface, so that they
(the VAE codec, prompt conditioning, PNG parameters, image latents) sit below
`pipeline.base.Pipeline`, which has all of it, and never import it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # importing this module must not import torch (`ldm --help` reads handover)
    import torch

    from ldm_cli.core.config import ModelConfig


class PipelineParts(Protocol):
    config: ModelConfig
    path: Path
    device: torch.device
    dtype: torch.dtype
    vae_tiling: str  # "auto", "on" or "off"
    file_clip_skip: int
    file_prediction: str | None
    vae_file: Path | None  # --vae FILE
    tiny_vae: object  # a TAESD (models.taesd.TinyAutoencoder) decoding in the VAE's place, or None
    tokenizer: object

    @property
    def vae(self): ...

    @property
    def text_encoder(self): ...

    @property
    def name(self) -> str: ...

    @property
    def model_hash(self) -> str: ...

    @property
    def networks(self): ...

    @property
    def latent_factor(self) -> int: ...

    @property
    def size_multiple(self) -> int: ...

    @property
    def is_inpainting(self) -> bool: ...

    @property
    def is_upscaler(self) -> bool: ...

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]: ...
