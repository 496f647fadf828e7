"""The x4 upscaler's U-Net, trained on the images' latents and their low-resolution copies.

The VAE and text encoder are frozen (an existing model's). Each training image of side S gives
its target latents (posterior means times the scale factor, S/f wide for an f=4 VAE) and a
low-resolution copy of S/f pixels, bicubic as `ldm upscale` users make them. As in the original
LatentUpscaleDiffusion, every example's low-res copy is noised to a level drawn uniformly from
[0, 350) by the augmentation schedule, concatenated to the noisy latents, and the level is the
U-Net's class label. The loss is the min-SNR weighted MSE against v (or eps); caption dropout,
EMA and the training loop are the main U-Net stage's (`unet_stage`, `loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_cli.core.config import ModelConfig
from ldm_cli.core.image_metrics import psnr
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.models.unet import UNetModel
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.pipeline.tasks.upscale import (
    MAX_NOISE_LEVEL,
    UpscaleOptions,
    noise_augment,
    upscale_pixels,
)
from ldm_cli.samplers.schedules import DiscreteSchedule
from ldm_cli.training.dataset import CaptionedImages, to_model_range
from ldm_cli.training.loop import StepRandom, note, stage_dir, train_stage
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.unet_stage import (
    CAPTION_DROPOUT,
    EMA_DECAY,
    TrainingExamples,
    UnetResult,
    assemble_model,
    finish_stage,
    load_stage_weights,
    prediction_target,
    prepare_examples,
    zero_init_like_ldm,
)
from ldm_cli.training.vae_stage import save_grid

STAGE = "upscaler"
WEIGHTS_FILE = "weights.safetensors"
SAMPLE_IMAGES = 8
EVAL_IMAGES = 64
# What `ldm upscale IMAGE CAPTION` does by default (the guidance scale is the checkpoint's).
EVAL_STEPS = 30
EVAL_SAMPLER = "ddim"
EVAL_NOISE_LEVEL = 20


@dataclass
class UpscalerExamples:
    target: TrainingExamples  # the latents to produce, with the caption features
    low_res: torch.Tensor  # [N, 3, S/f, S/f] in [-1, 1]


def weights_path(options: LoopOptions) -> Path:
    return stage_dir(options, STAGE) / WEIGHTS_FILE


def resize_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> PIL bicubic resizes to size x size, uint8."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        out[i] = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
    return out


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-res copies users would make of [N, 3, S, S] images: S/factor, bicubic."""
    return resize_bicubic(images, images.shape[-1] // factor)


def bicubic_upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The baseline the upscaler has to beat."""
    return resize_bicubic(images, images.shape[-1] * factor)


def prepare_upscaler_examples(
    vae: AutoencoderKL, text_encoder: CLIPTextEncoder, data: CaptionedImages, cfg: ModelConfig
) -> UpscalerExamples:
    target = prepare_examples(vae, text_encoder, data, cfg.vae.scale_factor)
    low_res = to_model_range(downsample(data.images, cfg.vae.downscale))
    return UpscalerExamples(target, low_res)


def upscaler_loss(
    unet,
    examples: UpscalerExamples,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    indices: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    device = next(unet.parameters()).device
    target_examples = examples.target
    x0 = target_examples.latents[indices]
    context = target_examples.features[target_examples.caption_ids[indices]]
    dropped = torch.rand(len(indices), generator=generator) < CAPTION_DROPOUT
    context = torch.where(dropped[:, None, None], target_examples.empty.to(context.dtype), context)
    t = torch.randint(0, len(alphas_cumprod), (len(indices),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    low_res = examples.low_res[indices]
    levels = torch.randint(0, MAX_NOISE_LEVEL, (len(indices),), generator=generator)
    low_res = noise_augment(low_res, torch.randn(low_res.shape, generator=generator), levels)
    inputs = torch.cat([noisy, low_res], dim=1).to(device)
    output = unet(inputs, t.to(device), context=context.float().to(device), y=levels.to(device))
    target, weight = prediction_target(x0, noise, a, prediction)
    return (weight.to(device) * (output.float() - target.to(device)).square()).mean()


def stage_pipeline(cfg: ModelConfig, unet: UNetModel, vae: AutoencoderKL, text: CLIPTextEncoder):
    from ldm_cli.pipeline.base import Pipeline

    device = next(unet.parameters()).device
    model = assemble_model(cfg, unet, vae.to(device), text.to(device))
    return Pipeline(model, Path(f"{STAGE}.safetensors"), device, torch.float32)


@torch.inference_mode()
def upscale_batch(
    pipe, low_res: torch.Tensor, seed: int, captions: list[str] | None = None
) -> torch.Tensor:
    """uint8 low-res images [N, 3, s, s] -> uint8 upscales, as `ldm upscale IMAGE [CAPTION]
    --seed` would make them (image i uses seed + i and captions[i]; the checkpoint's default
    guidance scale; no prompt, so no guidance, without captions)."""
    from ldm_cli.pipeline.request import Request

    size = low_res.shape[-1] * pipe.latent_factor
    options = UpscaleOptions(EVAL_NOISE_LEVEL, tile_size=0)
    cfg = pipe.config.default_cfg
    out = []
    for i, image in enumerate(low_res):
        prompt = captions[i] if captions else ""
        req = Request(prompt, "", EVAL_STEPS, cfg, seed + i, EVAL_SAMPLER, "auto", size, size)
        cond, uncond = pipe.conditioning([req])
        pixels = upscale_pixels(pipe, to_model_range(image[None]), req, cond, uncond, options)
        out.append((pixels * 255).round().to(torch.uint8))
    return torch.stack(out)


def evaluate(pipe, heldout: CaptionedImages, seed: int, count: int = EVAL_IMAGES) -> dict:
    """PSNR of the upscaler, prompted with each image's caption and without a prompt, and of
    bicubic interpolation on held-out images; the gain is the prompted one's."""
    originals = heldout.images[:count]
    factor = pipe.latent_factor
    low_res = downsample(originals, factor)
    prompted = psnr(
        upscale_batch(pipe, low_res, seed, heldout.captions[:count]), originals, identical=99.0
    )
    unprompted = psnr(upscale_batch(pipe, low_res, seed), originals, identical=99.0)
    bicubic = psnr(bicubic_upscale(low_res, factor), originals, identical=99.0)
    return {
        "images": len(originals),
        "cfg": pipe.config.default_cfg,
        "psnr_db": round(prompted, 2),
        "psnr_no_prompt_db": round(unprompted, 2),
        "bicubic_psnr_db": round(bicubic, 2),
        "gain_db": round(prompted - bicubic, 2),
        "gain_no_prompt_db": round(unprompted - bicubic, 2),
    }


def write_samples(pipe, samples: CaptionedImages, path: Path, seed: int) -> None:
    """Rows: bicubic, the upscaler (prompted with the captions), the original."""
    factor = pipe.latent_factor
    low_res = downsample(samples.images, factor)
    upscaled = upscale_batch(pipe, low_res, seed, samples.captions)
    rows = [bicubic_upscale(low_res, factor), upscaled, samples.images]
    save_grid(torch.cat(rows), path, rows=3)


def batch_for(base_batch: int, base_side: int, side: int) -> int:
    """The batch at `side` that costs what `base_batch` costs at `base_side` (same pixels)."""
    return max(1, base_batch * base_side**2 // side**2)


def train_upscaler(
    cfg: ModelConfig,
    vae: AutoencoderKL,
    text_encoder: CLIPTextEncoder,
    train: list[CaptionedImages],
    heldout: CaptionedImages,
    settings: StageSettings,
    options: LoopOptions,
    init: UNetModel | None = None,
    fingerprint: dict | None = None,
) -> UnetResult | None:
    """Train (or resume) the upscaler U-Net; None when stopped early by ``stop_after``.

    `train` holds one set per image side (the first the smallest): step k trains on set
    k mod len(train), with a batch of as many pixels as `settings.batch_size` images of the
    first set, so one model learns the domain at every scale. `init`: the U-Net to start from
    (a fine-tune), else LDM's zero-initialised residual branches. `fingerprint`: what else
    defines the run, checked on --resume (`loop.train_stage`)."""
    torch.manual_seed(options.seed + 3)
    unet = zero_init_like_ldm(UNetModel(cfg.unet))
    if init is not None:
        unet.load_state_dict(init.state_dict())
    sides = [int(part.images.shape[-1]) for part in train]
    note(
        options,
        f"{STAGE}: caching latents, low-res copies and captions of {len(train[0])} "
        f"images at {', '.join(f'{s}px' for s in sides)}",
    )
    examples = [prepare_upscaler_examples(vae, text_encoder, part, cfg) for part in train]
    batches = [batch_for(settings.batch_size, sides[0], side) for side in sides]
    alphas_cumprod = DiscreteSchedule(cfg.schedule).alphas_cumprod

    def loss_fn(model, draws: StepRandom) -> torch.Tensor:
        k = draws.step % len(examples)
        indices = draws.batch_indices(len(examples[k].low_res), batches[k])
        return upscaler_loss(
            model, examples[k], alphas_cumprod, cfg.prediction, indices, draws.local
        )

    samples = heldout.subset(torch.arange(min(SAMPLE_IMAGES, len(heldout))))
    samples_dir = options.run_dir / "samples"

    def sample_fn(ema_unet: UNetModel, step: int) -> None:
        pipe = stage_pipeline(cfg, ema_unet, vae, text_encoder)
        write_samples(pipe, samples, samples_dir / f"{STAGE}_{step:06d}.png", options.seed)

    result = train_stage(
        STAGE, unet, loss_fn, settings, options, EMA_DECAY, sample_fn, fingerprint=fingerprint
    )
    if not result.finished:
        return None
    first = round(result.losses[0], 5) if result.losses else None
    return finish_stage(STAGE, result, options, {"first_loss": first, "sides": sides})


def load_upscaler(cfg: ModelConfig, options: LoopOptions) -> UnetResult:
    return load_stage_weights(cfg, weights_path(options))
