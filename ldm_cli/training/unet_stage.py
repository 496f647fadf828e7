"""Stage 3: the U-Net, trained for eps-prediction on cached latents and text features.

The frozen VAE and text encoder run once over the data before training: posterior means
times the scale factor, and the encoder's context for every distinct caption (plus the empty
caption, used for 10% of the examples so classifier-free guidance works). Noise levels are
drawn uniformly from SD's 1000-step discrete schedule. An EMA of the weights is what gets
exported; periodic samples go through the same Pipeline code as ``ldm generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_cli.core.config import ModelConfig
from ldm_cli.models.attention import SpatialTransformer
from ldm_cli.models.clip_tower import tokenize
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.models.unet import UNetModel
from ldm_cli.models.unet_blocks import ResBlock
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.samplers.schedules import DiscreteSchedule
from ldm_cli.training.dataset import CaptionedImages
from ldm_cli.training.loop import (
    StepRandom,
    is_main_process,
    note,
    stage_dir,
    train_stage,
    wait_for_everyone,
)
from ldm_cli.training.run_log import merge_json
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.vae_stage import encode_means, save_grid

STAGE = "unet"
WEIGHTS_FILE = "weights.safetensors"
CAPTION_DROPOUT = 0.1
# "Offset noise": a per-image, per-channel constant added to the noise. SD's schedule leaves
# a trace of each latent channel's mean even at t = 999, so without it the model reads the
# overall colour off the noise instead of the prompt, and since sampling starts from
# zero-mean noise every flat background came out the same colour.
OFFSET_NOISE = 0.1
# Min-SNR loss weighting (Hang et al. 2023, gamma 5): the many nearly clean timesteps, where
# eps is easy, stop dominating the gradient, so the high-noise steps that decide layout and
# colour are learned several times faster.
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
SAMPLE_PROMPTS = 4
SAMPLE_STEPS = 25
SAMPLE_CFG = 5.0
SAMPLE_SAMPLER = "euler_a"
TEXT_BATCH = 256
# Cached text features above this many bytes are kept in fp16 (wide encoders, many captions).
FP32_FEATURE_BYTES = 2 * 2**30


@dataclass
class TrainingExamples:
    latents: torch.Tensor  # scaled latents [N, C, h, w]
    caption_ids: torch.Tensor  # [N] rows of `features`
    features: torch.Tensor  # [captions, 77, D]
    empty: torch.Tensor  # [77, D], the context of ""


@dataclass
class UnetResult:
    unet: UNetModel  # the EMA weights
    metrics: dict


def weights_path(options: LoopOptions) -> Path:
    return stage_dir(options, STAGE) / WEIGHTS_FILE


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextEncoder, captions: list[str]) -> torch.Tensor:
    device = next(text_encoder.parameters()).device
    tokens = tokenize(captions, text_encoder.cfg.pad_token_id)
    hidden = text_encoder.cfg.hidden_size
    size = len(captions) * tokens.shape[1] * hidden * 4
    dtype = torch.float32 if size <= FP32_FEATURE_BYTES else torch.float16
    out = torch.empty((len(captions), tokens.shape[1], hidden), dtype=dtype)
    for start in range(0, len(captions), TEXT_BATCH):
        batch = tokens[start : start + TEXT_BATCH].to(device)
        out[start : start + len(batch)] = text_encoder(batch).to(dtype).cpu()
    return out


def prepare_examples(
    vae: AutoencoderKL, text_encoder: CLIPTextEncoder, data: CaptionedImages, scale_factor: float
) -> TrainingExamples:
    latents = encode_means(vae, data.images).mul_(scale_factor)
    distinct = sorted(set(data.captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    caption_ids = torch.tensor([row[c] for c in data.captions])
    features = encode_captions(text_encoder, distinct + [""])
    return TrainingExamples(latents, caption_ids, features[:-1], features[-1])


@torch.no_grad()
def zero_init_like_ldm(unet: UNetModel) -> UNetModel:
    """Zero the last layer of every residual branch and the output conv, as the original
    openaimodel does (``zero_module``): each block starts as an identity, which trains faster.
    """
    for module in unet.modules():
        if isinstance(module, ResBlock):
            nn.init.zeros_(module.out_layers[-1].weight)
            nn.init.zeros_(module.out_layers[-1].bias)
        elif isinstance(module, SpatialTransformer):
            for param in module.proj_out.parameters():
                nn.init.zeros_(param)
    for param in unet.out[-1].parameters():
        nn.init.zeros_(param)
    return unet


def diffusion_loss(
    unet,
    examples: TrainingExamples,
    alphas_cumprod: torch.Tensor,
    indices: torch.Tensor,
    generator: torch.Generator,
    prediction: str = "eps",
) -> torch.Tensor:
    """Min-SNR weighted MSE of the eps (or v) prediction, at uniform timesteps; for "flow",
    the plain MSE of the velocity at logit-normal flow times (`flow_loss`)."""
    device = next(unet.parameters()).device
    if prediction == "flow":
        return flow_loss(unet, examples, indices, generator)
    batch = noised_batch(examples, alphas_cumprod, indices, generator, CAPTION_DROPOUT)
    output = unet(batch.noisy.to(device), batch.t.to(device), context=batch.context.to(device))
    return batch.loss(output, prediction)


def flow_loss(
    unet, examples: TrainingExamples, indices: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The rectified-flow objective (SD3's): x_t = (1 - t) x0 + t noise at flow times t drawn
    logit-normal (sigmoid of a standard normal: most steps in the middle, where the velocity
    is hardest), the U-Net given timestep 1000 t, its output regressed on noise - x0."""
    device = next(unet.parameters()).device
    x0, context = _rows(examples, indices, generator, CAPTION_DROPOUT)
    t = torch.sigmoid(torch.randn(len(indices), generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    s = t.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    output = unet(noisy.to(device), (t * 1000).to(device), context=context.to(device))
    return (output.float() - (noise - x0).to(device)).square().mean()


def _rows(examples: TrainingExamples, indices, generator, dropout: float):
    """The latents and text features of rows `indices`, captions dropped to the empty one
    at the dropout rate."""
    x0 = examples.latents[indices]
    context = examples.features[examples.caption_ids[indices]]
    dropped = torch.rand(len(indices), generator=generator) < dropout
    context = torch.where(dropped[:, None, None], examples.empty.to(context.dtype), context)
    return x0, context.float()


@dataclass
class NoisedBatch:
    x0: torch.Tensor
    noise: torch.Tensor
    a: torch.Tensor  # alphas_cumprod at each row's timestep [B, 1, 1, 1]
    t: torch.Tensor
    noisy: torch.Tensor
    context: torch.Tensor  # float32, captions dropped to the empty one at the dropout rate

    def loss(self, output: torch.Tensor, prediction: str) -> torch.Tensor:
        """Min-SNR weighted MSE of `output` against the eps (or v) target."""
        device = output.device
        target, weight = prediction_target(self.x0, self.noise, self.a, prediction)
        return (weight.to(device) * (output.float() - target.to(device)).square()).mean()


def noised_batch(
    examples: TrainingExamples,
    alphas_cumprod: torch.Tensor,
    indices: torch.Tensor,
    generator: torch.Generator,
    dropout: float,
) -> NoisedBatch:
    """The rows `indices` noised at uniform timesteps with offset noise, on the CPU."""
    x0, context = _rows(examples, indices, generator, dropout)
    t = torch.randint(0, len(alphas_cumprod), (len(indices),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noise += OFFSET_NOISE * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return NoisedBatch(x0, noise, a, t, noisy, context)


def prediction_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    a: torch.Tensor,
    prediction: str,
    gamma: float | None = MIN_SNR_GAMMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the U-Net should output ("eps" or "v") and its min-SNR loss weight (gamma None:
    weight 1, plain MSE), for latents ``x0`` noised with ``noise`` at alphas_cumprod ``a``."""
    if prediction not in ("eps", "v"):
        from ldm_cli.core.errors import UserError

        raise UserError(f"training on a {prediction}-prediction model is not supported here yet")
    if gamma is None:
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction == "v" else noise
        return target, torch.ones_like(a)
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction == "v":
        # v = sqrt(a) eps - sqrt(1 - a) x0; its MSE is (snr + 1) times the eps one's
        return a.sqrt() * noise - (1 - a).sqrt() * x0, clipped / (snr + 1)
    return noise, clipped / snr


def assemble_model(
    cfg: ModelConfig, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextEncoder
) -> LatentDiffusion:
    """A LatentDiffusion (original key layout) around already-built components."""
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.model.diffusion_model = unet
    model.first_stage_model = vae
    model.cond_stage_model = text_encoder
    return model


def write_samples(model: LatentDiffusion, prompts: list[str], path: Path, seed: int) -> None:
    """One image per prompt through the Pipeline's sampling code, as one PNG row."""
    from ldm_cli.pipeline.base import Pipeline

    device = next(model.unet.parameters()).device
    pipe = Pipeline(model, path, device, torch.float32)
    render_row(pipe, prompts, path, seed, model.config.default_size)


def render_row(
    pipe,
    prompts: list[str],
    path: Path,
    seed: int,
    size: int,
    steps: int = SAMPLE_STEPS,
    cfg: float = SAMPLE_CFG,
) -> None:
    """`pipe`'s image of each prompt (`SAMPLE_SAMPLER`, seed `seed`), side by side in one PNG."""
    import numpy as np

    from ldm_cli.pipeline.request import Request

    rows = []
    for prompt in prompts:
        req = Request(
            prompt,
            steps=steps,
            cfg=cfg,
            seed=seed,
            sampler=SAMPLE_SAMPLER,
            width=size,
            height=size,
        )
        ((_, image),) = pipe.render([req])
        rows.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    save_grid(torch.stack(rows), path, rows=1)


def train_unet(
    cfg: ModelConfig,
    vae: AutoencoderKL,
    text_encoder: CLIPTextEncoder,
    train: CaptionedImages,
    heldout: CaptionedImages,
    settings: StageSettings,
    options: LoopOptions,
    init: UNetModel | None = None,
    fingerprint: dict | None = None,
) -> UnetResult | None:
    """Train (or resume) the U-Net; ``cfg.vae.scale_factor`` must be the measured one.

    ``init``: a trained U-Net to start from (fine-tuning); parts of ``cfg.unet`` it lacks keep
    their fresh initialisation. ``fingerprint``: what else defines the run, checked on
    --resume (`loop.train_stage`). Returns None when stopped early by ``stop_after``.
    """
    torch.manual_seed(options.seed + 2)
    unet = zero_init_like_ldm(UNetModel(cfg.unet))
    if init is not None:
        from ldm_cli.training.fine_tune import start_from

        added = start_from(unet, init)
        if added:
            note(options, f"unet: {len(added)} modules new to the base start as identities")
    note(options, f"unet: caching the latents and text features of {len(train)} images")
    examples = prepare_examples(vae, text_encoder, train, cfg.vae.scale_factor)
    alphas_cumprod = DiscreteSchedule(cfg.schedule).alphas_cumprod

    def loss_fn(model, draws: StepRandom) -> torch.Tensor:
        indices = draws.batch_indices(len(examples.latents), settings.batch_size)
        return diffusion_loss(model, examples, alphas_cumprod, indices, draws.local, cfg.prediction)

    prompts = heldout.captions[:SAMPLE_PROMPTS]
    samples_dir = options.run_dir / "samples"

    def sample_fn(ema_unet: UNetModel, step: int) -> None:
        samples_dir.mkdir(parents=True, exist_ok=True)
        (samples_dir / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        model = assemble_model(cfg, ema_unet, vae, text_encoder)
        write_samples(model, prompts, samples_dir / f"unet_{step:06d}.png", options.seed)

    result = train_stage(
        STAGE, unet, loss_fn, settings, options, EMA_DECAY, sample_fn, fingerprint=fingerprint
    )
    if not result.finished:
        return None
    return finish_stage(STAGE, result, options, {"distinct_captions": len(examples.features)})


def finish_stage(stage: str, result, options: LoopOptions, extra: dict) -> UnetResult:
    """Save a finished U-Net stage's EMA weights and metrics (the main and upscaler stages)."""
    ema = result.ema.eval().requires_grad_(False)
    metrics = {
        "steps": result.step,
        "final_loss": result.final_loss(),
        **extra,
    }
    if is_main_process():
        from ldm_cli.checkpoints.save import save_checkpoint

        save_checkpoint(ema.state_dict(), stage_dir(options, stage) / WEIGHTS_FILE)
        merge_json(options.run_dir / "metrics.json", {stage: metrics})
    wait_for_everyone()
    return UnetResult(ema, metrics)


def load_stage_weights(cfg: ModelConfig, path: Path) -> UnetResult:
    from safetensors.torch import load_file

    unet = UNetModel(cfg.unet)
    unet.load_state_dict(load_file(str(path)))
    return UnetResult(unet.eval().requires_grad_(False), {})


def load_unet(cfg: ModelConfig, options: LoopOptions) -> UnetResult:
    return load_stage_weights(cfg, weights_path(options))
