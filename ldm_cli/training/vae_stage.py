"""Stage 1: the KL autoencoder, trained for reconstruction with a tiny KL term (LDM's kl-f*
recipe without the GAN and LPIPS terms).

Most steps see random half-size crops, four times as many as whole images for the same
compute: more varied batches, which is what speeds this stage up. The last steps see whole
images, because GroupNorm statistics and the mid-block attention span the whole image (a VAE
trained on crops alone lost ~7 dB on whole images).

Afterwards the latent scale factor is set so that scaled latents have unit variance (SD's
0.18215 is 1 / std of its VAE's latents), and reconstruction PSNR is measured on held-out
images at full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_cli.core.config import VAEConfig
from ldm_cli.core.image_metrics import psnr
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.training.dataset import CaptionedImages, to_model_range, to_uint8
from ldm_cli.training.loop import (
    StepRandom,
    is_main_process,
    stage_dir,
    train_stage,
    wait_for_everyone,
)
from ldm_cli.training.run_log import merge_json
from ldm_cli.training.settings import LoopOptions, StageSettings

STAGE = "vae"
WEIGHTS_FILE = "weights.safetensors"
# LDM applies kl_weight 1e-6 to the KL summed over the latent against an L1 summed over pixels;
# dividing it by the number of image values gives the same balance for a per-value mean L1.
KL_WEIGHT = 1e-6
MSE_WEIGHT = 1.0
# Initial posterior log-variance. At the default init (logvar ~ 0) the sampled latents are
# mostly noise and the decoder learns nothing for hundreds of steps; starting with small noise
# skips that plateau (the KL term may still raise it).
INITIAL_LOGVAR = -8.0
CROP_FRACTION = 0.75  # of the steps, before the whole-image steps
MIN_CROP = 16
SCALE_SAMPLE_IMAGES = 4096
ENCODE_BATCH = 64
SAMPLE_IMAGES = 8


@dataclass
class VaeResult:
    vae: AutoencoderKL
    config: VAEConfig  # with the measured scale_factor
    metrics: dict


def weights_path(options: LoopOptions) -> Path:
    return stage_dir(options, STAGE) / WEIGHTS_FILE


def crop_side(image_size: int, cfg: VAEConfig) -> int | None:
    """Half the image side, rounded to the latent grid; None when images are too small."""
    side = image_size // 2
    side -= side % (cfg.downscale * 2)
    return side if side >= MIN_CROP else None


def random_crops(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    n, _, height, width = images.shape
    tops = torch.randint(0, height - side + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, width - side + 1, (n,), generator=generator).tolist()
    return torch.stack(
        [img[:, t : t + side, s : s + side] for img, t, s in zip(images, tops, lefts, strict=True)]
    )


def reconstruction_loss(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    reconstruction, posterior = vae(images, sample_posterior=True, generator=generator)
    reconstruction = reconstruction.float()
    l1 = (reconstruction - images).abs().mean()
    mse = (reconstruction - images).square().mean()
    kl = posterior.kl().float().mean() / images[0].numel()
    return l1 + MSE_WEIGHT * mse + KL_WEIGHT * kl


def train_vae(
    cfg: VAEConfig,
    train: CaptionedImages,
    heldout: CaptionedImages,
    settings: StageSettings,
    options: LoopOptions,
    fingerprint: dict | None = None,
) -> VaeResult | None:
    """Train (or resume) the autoencoder; returns None when stopped early by ``stop_after``.
    ``fingerprint``: what else defines the run, checked on --resume (`loop.train_stage`)."""
    torch.manual_seed(options.seed)
    vae = AutoencoderKL(cfg)
    with torch.no_grad():
        vae.quant_conv.bias[cfg.embed_dim :] = INITIAL_LOGVAR
    images = train.images
    side = crop_side(images.shape[-1], cfg)
    crop_steps = int(settings.steps * CROP_FRACTION) if side else 0
    crop_batch = settings.batch_size * (images.shape[-1] // side) ** 2 if side else 0

    def loss_fn(model, draws: StepRandom) -> torch.Tensor:
        if draws.step < crop_steps:
            batch = images[draws.batch_indices(len(images), crop_batch)]
            batch = random_crops(batch, side, draws.local)
        else:
            batch = images[draws.batch_indices(len(images), settings.batch_size)]
        batch = to_model_range(batch).to(_device_of(model))
        return reconstruction_loss(model, batch, draws.local)

    samples_dir = options.run_dir / "samples"

    def sample_fn(model, step: int) -> None:
        originals = heldout.images[:SAMPLE_IMAGES]
        reconstructed = reconstruct(model, originals)
        save_grid(torch.cat([originals, reconstructed]), samples_dir / f"vae_{step:06d}.png", 2)

    result = train_stage(
        STAGE, vae, loss_fn, settings, options, sample_fn=sample_fn, fingerprint=fingerprint
    )
    if not result.finished:
        return None
    vae = result.model.eval().requires_grad_(False)
    latent_std = measure_latent_std(vae, train.images[:SCALE_SAMPLE_IMAGES])
    psnr = heldout_psnr(vae, heldout.images)
    config = replace(cfg, scale_factor=round(1.0 / latent_std, 5))
    metrics = {
        "psnr_db": round(psnr, 2),
        "latent_std": round(latent_std, 5),
        "scale_factor": config.scale_factor,
        "heldout_images": len(heldout),
        "steps": result.step,
    }
    if is_main_process():
        save_vae(vae, config, metrics, weights_path(options))
        merge_json(options.run_dir / "metrics.json", {STAGE: metrics})
    wait_for_everyone()
    return VaeResult(vae, config, metrics)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_means(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means (unscaled latents) of uint8 images, on the CPU."""
    device = _device_of(vae)
    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        batch = to_model_range(images[start : start + ENCODE_BATCH]).to(device)
        out.append(vae.encode(batch).mode().float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> uint8 reconstructions through the posterior mean."""
    device = _device_of(vae)
    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        batch = to_model_range(images[start : start + ENCODE_BATCH]).to(device)
        out.append(to_uint8(vae.decode(vae.encode(batch).mode()).cpu()))
    return torch.cat(out)


def measure_latent_std(vae: AutoencoderKL, images: torch.Tensor) -> float:
    return float(encode_means(vae, images).std())


def heldout_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """PSNR in dB of the 8-bit reconstructions, from the mean squared error over all images."""
    return psnr(reconstruct(vae, images), images, identical=99.0)


def save_vae(vae: AutoencoderKL, cfg: VAEConfig, metrics: dict, path: Path) -> None:
    from ldm_cli.checkpoints.save import save_checkpoint

    metadata = {"scale_factor": repr(cfg.scale_factor), "psnr_db": repr(metrics["psnr_db"])}
    save_checkpoint(vae.state_dict(), path, metadata=metadata)


def load_vae(cfg: VAEConfig, path: Path) -> VaeResult:
    """The finished stage from its weights file (its scale factor is in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    config = replace(cfg, scale_factor=float(metadata["scale_factor"]))
    vae = AutoencoderKL(config)
    vae.load_state_dict(load_file(str(path)))
    metrics = {
        "psnr_db": float(metadata.get("psnr_db", "nan")),
        "scale_factor": config.scale_factor,
    }
    return VaeResult(vae.eval().requires_grad_(False), config, metrics)


def save_grid(images: torch.Tensor, path: Path, rows: int) -> None:
    """uint8 [N, 3, H, W] -> one PNG with ``rows`` rows."""
    from PIL import Image

    n, channels, height, width = images.shape
    columns = math.ceil(n / rows)
    padded = F.pad(images, (0, 0, 0, 0, 0, 0, 0, rows * columns - n))
    grid = padded.reshape(rows, columns, channels, height, width).permute(0, 3, 1, 4, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.reshape(rows * height, columns * width, channels).numpy()).save(path)
