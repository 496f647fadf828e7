"""Which TAESD (tiny autoencoder) file a checkpoint is, read from its tensor names and shapes.

Three layouts exist. madebyollin's own files hold one part each, an ``nn.Sequential`` with no
prefix: ``taesd_decoder.safetensors`` (``0`` is a parameter-free clamp, so its first conv is
``1.weight``) and ``taesd_encoder.safetensors`` (first conv ``0.weight``). diffusers'
``AutoencoderTiny`` keeps both parts in one file under ``decoder.layers.`` and
``encoder.layers.``; its decoder does the clamp outside the Sequential, so each of its layer
indices is one less than the original's. Loading renames a file key to the original name by
stripping the part's prefix and adding ``index_shift`` to the leading layer index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ldm_cli.checkpoints.header import CheckpointHeader

IMAGE_CHANNELS = 3
_LAYER_KEY = re.compile(r"^(\d+)\.(.+)$")


@dataclass(frozen=True)
class TAESDPart:
    """Where one part (encoder or decoder) lies in a file."""

    prefix: str
    # added to the file's layer index to give the original one
    index_shift: int = 0

    def module_key(self, file_key: str) -> str:
        index, rest = _LAYER_KEY.match(file_key[len(self.prefix) :]).groups()
        return f"{int(index) + self.index_shift}.{rest}"

    def file_key(self, module_key: str) -> str:
        index, rest = _LAYER_KEY.match(module_key).groups()
        return f"{self.prefix}{int(index) - self.index_shift}.{rest}"


@dataclass(frozen=True)
class TAESDLayout:
    latent_channels: int
    decoder: TAESDPart | None
    encoder: TAESDPart | None


# the places a part is found: madebyollin's files (no prefix), diffusers' AutoencoderTiny
_DECODER_PLACES = (TAESDPart(""), TAESDPart("decoder.layers.", index_shift=1))
_ENCODER_PLACES = (TAESDPart(""), TAESDPart("encoder.layers."))
# original index of each part's first conv (the decoder's 0 is the clamp)
_DECODER_FIRST_CONV = 1
_ENCODER_FIRST_CONV = 0


def taesd_layout(
    keys_and_shapes: dict[str, tuple[int, ...]] | CheckpointHeader,
) -> TAESDLayout | None:
    """The TAESD parts a file holds and their latent width; None for anything else, including
    a file with tensors that belong to no part."""
    if isinstance(keys_and_shapes, CheckpointHeader):
        keys_and_shapes = {k: t.shape for k, t in keys_and_shapes.tensors.items()}
    shapes = keys_and_shapes
    decoders = [(p, c) for p in _DECODER_PLACES if (c := _decoder_latents(shapes, p)) is not None]
    encoders = [(p, c) for p in _ENCODER_PLACES if (c := _encoder_latents(shapes, p)) is not None]
    if len(decoders) > 1 or len(encoders) > 1 or not (decoders or encoders):
        return None
    decoder, decoder_latents = decoders[0] if decoders else (None, None)
    encoder, encoder_latents = encoders[0] if encoders else (None, None)
    if decoder and encoder and decoder_latents != encoder_latents:
        return None
    parts = [p for p in (decoder, encoder) if p is not None]
    if not all(any(_layer_key(k, p.prefix) for p in parts) for k in shapes):
        return None
    return TAESDLayout(decoder_latents or encoder_latents, decoder, encoder)


def _layer_key(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and _LAYER_KEY.match(key[len(prefix) :]) is not None


def _layer_indices(shapes: dict[str, tuple[int, ...]], part: TAESDPart) -> list[int]:
    return sorted(
        {int(part.module_key(k).split(".")[0]) for k in shapes if _layer_key(k, part.prefix)}
    )


def _conv_shape(shapes, part: TAESDPart, index: int) -> tuple[int, ...] | None:
    return shapes.get(part.file_key(f"{index}.weight"))


def _decoder_latents(shapes: dict[str, tuple[int, ...]], part: TAESDPart) -> int | None:
    """Latent channels of a decoder at `part`: its first conv reads them, its last makes RGB."""
    indices = _layer_indices(shapes, part)
    if not indices or indices[0] != _DECODER_FIRST_CONV:
        return None
    first = _conv_shape(shapes, part, _DECODER_FIRST_CONV)
    last = _conv_shape(shapes, part, indices[-1])
    if not (_is_3x3(first) and _is_3x3(last) and last[0] == IMAGE_CHANNELS):
        return None
    return first[1] if first[0] == last[1] else None


def _encoder_latents(shapes: dict[str, tuple[int, ...]], part: TAESDPart) -> int | None:
    """Latent channels of an encoder at `part`: its first conv reads RGB, its last makes them."""
    indices = _layer_indices(shapes, part)
    if not indices or indices[0] != _ENCODER_FIRST_CONV:
        return None
    first = _conv_shape(shapes, part, _ENCODER_FIRST_CONV)
    last = _conv_shape(shapes, part, indices[-1])
    if not (_is_3x3(first) and _is_3x3(last) and first[1] == IMAGE_CHANNELS):
        return None
    return last[0] if first[0] == last[1] else None


def _is_3x3(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) == 4 and shape[2:] == (3, 3)
