"""Scripting ldm from Python: the CLI is a thin layer over this API.

.venv/bin/python examples/python_api.py [CHECKPOINT.safetensors]
"""

import sys

import torch

import ldm_cli
from ldm_cli.core.pngmeta import write_png

pipe = ldm_cli.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu", dtype="fp32")

# Whole images: image k uses seed + k; each carries its A1111 parameters text.
images = pipe.generate(
    "a red circle on a blue background",
    steps=20,
    cfg=7.5,
    seed=1,
    sampler="dpmpp_2m",
    scheduler="karras",
    num_images=2,
)
for k, image in enumerate(images):
    write_png(image, f"api-{k}.png", image.info["parameters"])

# The components keep the original Stable Diffusion call signatures.
with torch.inference_mode():
    context = pipe.text_encoder(pipe.tokenizer(["a green star"]))  # [1, 77, D]
    size = pipe.config.default_size // pipe.latent_factor
    x = torch.randn(1, pipe.config.unet.in_channels, size, size)
    eps = pipe.unet(x, torch.tensor([999.0]), context)  # noise prediction
    picture = pipe.vae.decode(x / pipe.config.vae.scale_factor)  # [-1, 1] RGB
    print(context.shape, eps.shape, picture.shape)
