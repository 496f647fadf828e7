"""`ldm train lcm`: an LCM-LoRA, a LoRA that makes a model draw in a few steps with
`--sampler lcm` (latent consistency distillation, Luo et al. 2023, as diffusers'
train_lcm_distill_lora scripts do it).

The model is its own teacher. Each step picks, per example, one of the 50 distillation
timesteps t (999, 979, ..., 19; the `lcm` schedule's), noises the example's latents to t, and:

- the teacher (the frozen model, LoRA off) takes one guided DDIM step from t to s = t - 20, its
  classifier-free guidance at the teacher's scale (`cfg`), cond and uncond in one batch;
- the target (the model with the LoRA, no gradient) maps that point at s to its consistency
  output ``c_skip(s) x_s + c_out(s) x0(x_s, s)``;
- the student (the model with the LoRA) maps the point at t to ``c_skip(t) x_t + c_out(t)
  x0(x_t, t)``, and the loss is the pseudo-Huber distance (c = 0.001) between the two.

c_skip/c_out are LCMScheduler's boundary scalings (samplers.consistency), so the LoRA learns
exactly what `--sampler lcm` computes. Everything else (data folder, resume, the file in
kohya's format with ``ss_*`` metadata) is `ldm train lora`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm_cli.samplers.consistency import lcm_boundary_scalings
from ldm_cli.samplers.schedules import LCM_ORIGINAL_STEPS, DiscreteSchedule
from ldm_cli.training.adapter_data import step_captions
from ldm_cli.training.adapter_stage import (
    AdapterTrainer,
    cache_latents,
)
from ldm_cli.training.loop import StepRandom, note, train_stage
from ldm_cli.training.lora_network import LoraNetwork
from ldm_cli.training.lora_run import LoraJob, attached_network, finish_lora

STAGE = "lcm"
HUBER_C = 0.001


@dataclass(frozen=True)
class DistillOptions:
    cfg: float | None = None  # the teacher's guidance scale; None: the model's own


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per timestep, shaped to broadcast over latents."""
    pairs = [lcm_boundary_scalings(float(v)) for v in t.tolist()]
    skip = torch.tensor([p[0] for p in pairs]).view(-1, 1, 1, 1)
    out = torch.tensor([p[1] for p in pairs]).view(-1, 1, 1, 1)
    return skip, out


def x0_and_eps(output, noisy, a, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents and the noise a U-Net's output (eps or v) implies at alphas_cumprod a."""
    if prediction == "v":
        x0 = a.sqrt() * noisy - (1 - a).sqrt() * output
        return x0, a.sqrt() * output + (1 - a).sqrt() * noisy
    return (noisy - (1 - a).sqrt() * output) / a.sqrt(), output


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()).square() + HUBER_C**2).sqrt().mean() - HUBER_C


class Distiller:
    """The consistency-distillation loss of one step (module docstring)."""

    def __init__(self, trainer: AdapterTrainer, network: LoraNetwork, pipe, guidance: float):
        self.trainer, self.network, self.pipe = trainer, network, pipe
        self.guidance = guidance
        schedule = DiscreteSchedule(pipe.config.schedule)
        self.alphas = schedule.alphas_cumprod
        n = schedule.num_train_timesteps
        self.skip = n // LCM_ORIGINAL_STEPS
        self.timesteps = torch.arange(1, LCM_ORIGINAL_STEPS + 1) * self.skip - 1

    def unet(self, noisy, t, context, y, lora: bool) -> torch.Tensor:
        self.network.enabled = lora
        try:
            return self.pipe.model.unet(noisy, t, context=context, y=y).float()
        finally:
            self.network.enabled = True

    def loss(self, model: nn.Module, x0: torch.Tensor, texts: list[str], generator) -> torch.Tensor:
        device, prediction = self.pipe.device, self.pipe.config.prediction
        b = len(x0)
        pick = torch.randint(0, LCM_ORIGINAL_STEPS, (b,), generator=generator)
        t = self.timesteps[pick]
        s = (t - self.skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator)
        a_t, a_s = self.alphas[t].view(-1, 1, 1, 1), self.alphas[s].view(-1, 1, 1, 1)
        noisy = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        noisy, t_dev, s_dev = noisy.to(device), t.to(device), s.to(device)
        a_t, a_s = a_t.to(device), a_s.to(device)
        with torch.no_grad():
            context, y = self.trainer.conditioning(texts + [""] * b)
            pair = torch.cat([noisy, noisy])
            both = self.unet(pair, torch.cat([t_dev, t_dev]), context, y, lora=False)
            x0_both, eps_both = x0_and_eps(both, pair, a_t.repeat(2, 1, 1, 1), prediction)
            w = self.guidance - 1
            x0_c, x0_u = x0_both.chunk(2)
            eps_c, eps_u = eps_both.chunk(2)
            x0_g, eps_g = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            x_s = a_s.sqrt() * x0_g + (1 - a_s).sqrt() * eps_g  # the teacher's DDIM step
            cond = context[:b], None if y is None else y[:b]
            out_s = self.unet(x_s, s_dev, *cond, lora=True)
            skip_s, c_out_s = (v.to(device) for v in boundary(s))
            target = skip_s * x_s + c_out_s * x0_and_eps(out_s, x_s, a_s, prediction)[0]
        out_t = model(noisy, t_dev, texts).float()  # the student: gradients reach the LoRA
        skip_t, c_out_t = (v.to(device) for v in boundary(t))
        student = skip_t * noisy + c_out_t * x0_and_eps(out_t, noisy, a_t, prediction)[0]
        return pseudo_huber(student, target)


def train_lcm(lora: LoraJob, options: DistillOptions) -> dict | None:
    """Distil the model into an LCM-LoRA and write it; its summary, or None when stopped
    early (state saved)."""
    job, spec = lora.job, lora.spec
    job.check()
    spec.check()
    pipe, size, data, network, db = attached_network(lora)
    trainer = AdapterTrainer(network, pipe, db, False, size)
    guidance = pipe.config.default_cfg if options.cfg is None else options.cfg
    distiller = Distiller(trainer, network, pipe, guidance)
    count = sum(p.numel() for p in network.parameters())
    note(job.loop(), f"lcm: {len(network.layers)} layers, {count:,} parameters, cfg {guidance:g}")
    note(job.loop(), f"lcm: encoding {len(data.images)} images")
    latents = cache_latents(pipe, data)
    rows = data.example_rows()
    settings = job.settings()

    def loss_fn(model: nn.Module, draws: StepRandom) -> torch.Tensor:
        picked = rows[draws.batch_indices(len(rows), settings.batch_size)]
        texts = step_captions([data.captions[int(i)] for i in picked], job.captions, draws.local)
        return distiller.loss(model, latents[picked], texts, draws.local)

    fingerprint = job.fingerprint(
        {"lora": spec.__dict__, "layout": lora.layout, "objective": "lcm", "cfg": guidance}
    )
    result = train_stage(STAGE, trainer, loss_fn, settings, job.loop(), fingerprint=fingerprint)
    summary = finish_lora(network, lora, pipe, data, result, size, digits=6)
    return None if summary is None else {**summary, "cfg": guidance}
