"""Step previews (`--preview FILE`): the sampler's current x0 estimate as a small PNG.

Running the VAE decoder every few steps would cost as much as the final decode each time, so
previews use a per-model linear map from latent channels to RGB (plus a bias), fitted once by
least squares against the model's own decoder: a few small random latents are decoded, the
image is average-pooled by the VAE factor back to the latent grid, and each latent cell's
channels are regressed onto its pooled colour.

The random latents are the VAE encoder's posterior means of random blocks of flat colour, not
unit Gaussian noise: real latents are not centred on zero (the embedded model's channel means
are about -0.9, 0.2, 1.0, 0.05), and a map fitted around zero gets the colours of real images
wrong (mean error 0.57 on [-1, 1] against 0.23 for the encoded blocks, measured on generated
images of the embedded model; see tests/runtime/test_preview.py).

The pipeline hands each step's x0 to `pipe.preview` (see `Pipeline.sample`); samplers know
nothing of previews.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from ldm_cli.runtime.preview_file import PREVIEW_KEY, check_preview_path

FIT_SIZE = 16  # latent cells per side of each fitting sample
FIT_BLOCKS = 4  # flat colour blocks per side of each fitting image
FIT_SAMPLES = 4
FIT_SEED = 0
MIN_PREVIEW_SIDE = 128  # previews are scaled up by an integer factor to at least this


@torch.inference_mode()
def fit_preview_matrix(pipe) -> torch.Tensor:
    """The [3, C + 1] float32 CPU matrix W with rgb = W[:, :C] @ latent + W[:, C], rgb in
    [-1, 1], fitted to `pipe`'s VAE decoder (latents at the sampler's scale)."""
    from ldm_cli.core.numerics import decode_finite

    z = random_latents(pipe)
    images = decode_finite(pipe.vae, z.to(pipe.device), pipe.config.vae.scale_factor, pipe.dtype)
    pooled = F.avg_pool2d(images.float().cpu(), pipe.latent_factor)  # [N, 3, S, S]
    inputs = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # [N, C + 1, S, S]
    a = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1]).double()
    b = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
    return torch.linalg.lstsq(a, b).solution.T.float().contiguous()


def random_latents(pipe) -> torch.Tensor:
    """[FIT_SAMPLES, C, FIT_SIZE, FIT_SIZE] float32 CPU latents of seeded random colour blocks."""
    gen = torch.Generator("cpu").manual_seed(FIT_SEED)
    colours = torch.rand(FIT_SAMPLES, 3, FIT_BLOCKS, FIT_BLOCKS, generator=gen) * 2 - 1
    images = F.interpolate(colours, size=FIT_SIZE * pipe.latent_factor, mode="nearest")
    dtype = next(pipe.vae.parameters()).dtype
    posterior = pipe.vae.encode(images.to(pipe.device, dtype))
    return posterior.mean.float().cpu() * pipe.config.vae.scale_factor


def latents_to_rgb(x0: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, 3, h, w] float RGB in [-1, 1] through the linear map."""
    x0 = x0.detach().float().cpu()
    rgb = torch.einsum("oc,bchw->bohw", matrix[:, :-1], x0) + matrix[:, -1, None, None]
    return torch.nan_to_num(rgb).clamp(-1, 1)  # an overflowing step shows, not crashes


@torch.inference_mode()
def tiny_decoded(x0: torch.Tensor, tiny) -> torch.Tensor:
    """[B, 3, H, W] RGB in [-1, 1] from a TAESD (`--vae taesd...`): full-size previews for the
    cost of about a tenth of a VAE decode."""
    dtype = next(tiny.parameters()).dtype
    rgb = tiny.decode(x0.to(dtype)).float().cpu()
    return torch.nan_to_num(rgb).clamp(-1, 1)


def preview_image(x0: torch.Tensor, matrix: torch.Tensor, tiny=None) -> Image.Image:
    """The batch side by side, scaled up so its height is at least MIN_PREVIEW_SIDE; decoded
    by `tiny` (a TAESD) when there is one, else through the linear map."""
    rgb = latents_to_rgb(x0, matrix) if tiny is None else tiny_decoded(x0, tiny)
    row = torch.cat(list(rgb), dim=2)  # [3, h, B * w]
    pixels = ((row + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels)
    scale = max(1, -(-MIN_PREVIEW_SIDE // image.height))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def write_png_atomic(image: Image.Image, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename, so a viewer watching
    `path` never reads a partial file. The PNG is marked as a preview (preview_file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    marker = PngImagePlugin.PngInfo()
    marker.add_text(PREVIEW_KEY, "1")
    try:
        image.save(tmp, format="PNG", pnginfo=marker)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PreviewWriter:
    """Writes the x0 estimate to `path` every `every` steps and after the last step.

    Set it as `pipe.preview`; the pipeline calls it as `writer(pipe, step, total, x0)` with
    step counting from 1.
    """

    def __init__(self, path: str | os.PathLike, every: int = 5):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.written = 0
        self.failed = False
        check_preview_path(self.path, "preview")  # never replaces a file it did not write

    def __call__(self, pipe, step: int, total: int, x0: torch.Tensor) -> None:
        if self.failed or (step % self.every and step != total):
            return
        try:
            tiny = getattr(pipe, "tiny_vae", None)
            matrix = None if tiny is not None else pipe.preview_matrix
            write_png_atomic(preview_image(x0, matrix, tiny), self.path)
        except OSError as error:  # a full disk or a folder gone: the run itself goes on
            self.failed = True
            reason = error.strerror or error
            print(
                f"warning: preview {self.path} not written ({reason}); previews stop",
                file=sys.stderr,
            )
            return
        self.written += 1
