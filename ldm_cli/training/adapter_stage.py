"""What LoRA and textual-inversion training share: a frozen model, cached latents, the loss the
model was trained with, preview images, and the loop of :mod:`ldm_cli.training.loop`.

The model is loaded as ``ldm generate`` loads it (any SD 1.x, 2.x eps/v, SDXL file or the
embedded model), in float32, its weights frozen. Latents are the VAE's posterior means of the
images, computed once. Each step draws, from the step's own seeded generator (so a resumed
run replays it exactly), a batch of examples, their captions (shuffled or dropped as asked),
uniform timesteps of the model's 1000-step schedule and the noise (plus offset noise if
asked); the loss is the MSE of the model's own prediction (eps or v), min-SNR weighted if
asked. Text is encoded every step through the embeddings database of
:mod:`ldm_cli.text.embeddings` (how a trained TI vector enters the text encoder), with
gradients only when something in the text path trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_cli.core.errors import UserError
from ldm_cli.samplers.schedules import DiscreteSchedule
from ldm_cli.training.adapter_data import CaptionOptions, ConceptImages, step_captions
from ldm_cli.training.loop import StepRandom, note, train_stage
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.unet_stage import prediction_target, render_row
from ldm_cli.training.vae_stage import encode_means

SAMPLE_STEPS = 20
SAMPLE_CFG = 7.0


@dataclass(frozen=True)
class LossOptions:
    min_snr_gamma: float | None = None  # None: plain MSE
    noise_offset: float = 0.0


class AdapterTrainer(nn.Module):
    """The trainable part as a module of its own (what the optimizer, accelerate's saved state
    and DDP see) around the frozen pipeline, which is not a submodule."""

    def __init__(self, trainable: nn.Module, pipe, db, text_trains: bool, size: int):
        super().__init__()
        self.trainable = trainable
        self._frozen = (pipe, db)
        self.text_trains = text_trains
        self.size = size  # the training side (SDXL's size conditioning)

    def conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, y) of plain-text captions, as the pipeline encodes a one-chunk prompt."""
        from ldm_cli.text.embeddings import encode_truncated

        pipe, db = self._frozen
        with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
            encoded = encode_truncated(db, pipe.model.text_encoder, captions)
        if not pipe.config.conditioner:
            return encoded.float(), None
        from ldm_cli.pipeline.tasks.sdxl import adm_embed_dim, adm_vector

        context, pooled = encoded
        ids = torch.tensor(pipe.time_ids(self.size, self.size), device=pooled.device)
        return context.float(), adm_vector(pooled.float(), ids, adm_embed_dim(pipe.config))

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        pipe, _ = self._frozen
        context, y = self.conditioning(captions)
        return pipe.model.unet(noisy, t, context=context, y=y)


def load_frozen_pipeline(model_path: Path | None, threads: int | None = None):
    """The model (default: the embedded one) in float32 on this process's device (accelerate's
    choice), every weight frozen; on a CPU, the run's thread count set first."""
    from ldm_cli.pipeline.load import LoadOptions, load_pipeline
    from ldm_cli.runtime.distributed import partial_state
    from ldm_cli.training.loop import use_cpu_threads

    state = partial_state()
    if state.device.type == "cpu":
        use_cpu_threads(threads, state.num_processes)
    options = LoadOptions(low_memory=False)
    pipe = load_pipeline(model_path, state.device, torch.float32, options)
    if pipe.is_inpainting or pipe.is_upscaler:
        raise UserError(f"{pipe.name} is an inpainting or upscaling model; train on a base model")
    pipe.model.requires_grad_(False).eval()
    return pipe


def checkpoint_blocks(unet: nn.Module) -> None:
    """Gradient checkpointing: each block of the U-Net keeps only its input for the backward
    pass and recomputes its activations there (less memory, about a third more compute; the
    same numbers). Inference (the previews) runs the blocks as before."""
    from torch.utils.checkpoint import checkpoint

    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        plain = block.forward

        def run(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = run


def cache_latents(pipe, data: ConceptImages) -> torch.Tensor:
    """Scaled posterior means of the images (a normal tensor, usable under autograd)."""
    means = encode_means(pipe.model.first_stage_model, data.images)
    return means.clone() * pipe.config.vae.scale_factor


def train_adapter(
    stage: str,
    trainer: AdapterTrainer,
    data: ConceptImages,
    captions: CaptionOptions,
    loss_options: LossOptions,
    settings: StageSettings,
    options: LoopOptions,
    sample_fn: Callable[[nn.Module, int], None] | None,
    fingerprint: dict,
):
    """Run the loop over `trainer`; returns the loop's StageResult."""
    pipe, _ = trainer._frozen
    note(options, f"{stage}: encoding {len(data.images)} images")
    latents = cache_latents(pipe, data)
    rows = data.example_rows()
    alphas_cumprod = DiscreteSchedule(pipe.config.schedule).alphas_cumprod
    prediction = pipe.config.prediction

    def loss_fn(model: nn.Module, draws: StepRandom) -> torch.Tensor:
        picked = rows[draws.batch_indices(len(rows), settings.batch_size)]
        generator = draws.local
        texts = step_captions([data.captions[int(i)] for i in picked], captions, generator)
        x0 = latents[picked]
        t = torch.randint(0, len(alphas_cumprod), (len(picked),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        if loss_options.noise_offset:
            offset = torch.randn((*x0.shape[:2], 1, 1), generator=generator)
            noise = noise + loss_options.noise_offset * offset
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target, weight = prediction_target(x0, noise, a, prediction, loss_options.min_snr_gamma)
        device = pipe.device
        output = model(noisy.to(device), t.to(device), texts)
        target, weight = target.to(device), weight.to(device)
        loss = (weight * (output.float() - target).square()).mean()
        if not loss.requires_grad:  # no caption of the batch holds the TI token (dropout)
            loss = loss + sum(p.sum() for p in model.parameters()) * 0.0
        return loss

    return train_stage(
        stage, trainer, loss_fn, settings, options, sample_fn=sample_fn, fingerprint=fingerprint
    )


def preview_writer(pipe, prompts: list[str], folder: Path, seed: int, size: int, prepare=None):
    """A sample_fn writing one image per prompt (the pipeline's own render) as a PNG row."""

    def write(module: nn.Module, step: int) -> None:
        if prepare is not None:
            prepare()
        path = folder / f"step_{step:06d}.png"
        render_row(pipe, prompts, path, seed, size, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG)

    return write
