"""Seeded random TAESD files in each layout they come in, and the same weights for diffusers.

The original names are listed here from madebyollin's taesd.py, not taken from our modules, so
a test built on them checks our numbering too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Layers of madebyollin's Sequentials that hold weights: (index, kind), where "conv" has a bias,
# "conv-nobias" has none and "block" is a residual block of three biased convs (64 wide, so its
# skip is an identity). Decoder layer 0 is the clamp and 2, 6, 11, 16 are the ReLU and upsamples.
ORIGINAL_DECODER_LAYERS = (
    [(1, "conv")]
    + [(i, "block") for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)]
    + [(i, "conv-nobias") for i in (7, 12, 17)]
    + [(19, "conv")]
)
ORIGINAL_ENCODER_LAYERS = (
    [(0, "conv")]
    + [(i, "block") for i in (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)]
    + [(i, "conv-nobias") for i in (2, 6, 10)]
    + [(14, "conv")]
)
WIDTH = 64
# Weights of std gain / sqrt(fan-in) keep activations about unit size through the ~40 convs, so
# outputs are neither flat nor huge and an absolute tolerance means what it would on real weights.
WEIGHT_GAIN = 1.0
BIAS_STD = 0.1


def original_shapes(part: str, latent_channels: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of madebyollin's taesd_decoder / taesd_encoder file."""
    layers = ORIGINAL_DECODER_LAYERS if part == "decoder" else ORIGINAL_ENCODER_LAYERS
    first, last = layers[0][0], layers[-1][0]
    shapes = {}
    for index, kind in layers:
        if kind == "block":
            for conv in (0, 2, 4):
                shapes[f"{index}.conv.{conv}.weight"] = (WIDTH, WIDTH, 3, 3)
                shapes[f"{index}.conv.{conv}.bias"] = (WIDTH,)
            continue
        in_channels, out_channels = WIDTH, WIDTH
        if index == first:
            in_channels = latent_channels if part == "decoder" else 3
        if index == last:
            out_channels = 3 if part == "decoder" else latent_channels
        shapes[f"{index}.weight"] = (out_channels, in_channels, 3, 3)
        if kind == "conv":
            shapes[f"{index}.bias"] = (out_channels,)
    return shapes


def random_original_state(part: str, latent_channels: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for one part, with the original names."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(original_shapes(part, latent_channels).items()):
        noise = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = noise * (WEIGHT_GAIN / fan_in**0.5)
        else:
            state[name] = noise * BIAS_STD
    return state


def to_diffusers_names(
    decoder: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """AutoencoderTiny's names: its DecoderTiny clamps outside the Sequential, so every decoder
    index is one less than the original's."""
    state = {}
    for name, tensor in decoder.items():
        index, rest = name.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = tensor
    for name, tensor in encoder.items():
        state[f"encoder.layers.{name}"] = tensor
    return state


def write_taesd_files(folder: Path, latent_channels: int, seed: int) -> dict[str, Path]:
    """madebyollin's decoder and encoder files and diffusers' single file, all of the same
    weights: {"decoder": ..., "encoder": ..., "diffusers": ...}."""
    decoder = random_original_state("decoder", latent_channels, seed)
    encoder = random_original_state("encoder", latent_channels, seed + 1)
    paths = {
        "decoder": folder / f"taesd{latent_channels}_decoder.safetensors",
        "encoder": folder / f"taesd{latent_channels}_encoder.safetensors",
        "diffusers": folder / f"taesd{latent_channels}_diffusers.safetensors",
    }
    save_file(decoder, str(paths["decoder"]))
    save_file(encoder, str(paths["encoder"]))
    save_file(to_diffusers_names(decoder, encoder), str(paths["diffusers"]))
    return paths


def diffusers_reference(latent_channels: int, seed: int):
    """diffusers' AutoencoderTiny holding the weights `write_taesd_files(..., seed)` writes."""
    import diffusers

    decoder = random_original_state("decoder", latent_channels, seed)
    encoder = random_original_state("encoder", latent_channels, seed + 1)
    model = diffusers.AutoencoderTiny(latent_channels=latent_channels, scaling_factor=1.0)
    model.load_state_dict(to_diffusers_names(decoder, encoder), strict=True)
    return model.eval()
