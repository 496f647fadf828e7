"""`ldm train lcm` on a tiny SD 1.x-layout checkpoint: the consistency-distillation loss is
the one LCM's scripts compute (checked against a plain recomputation with diffusers'
LCMScheduler and DDIMScheduler), the teacher runs without the LoRA, the file is a LoRA that
`--sampler lcm` uses, and a stopped run resumes to the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_cli.pipeline.load import load
from ldm_cli.training.lcm_distill import Distiller, DistillOptions, pseudo_huber, train_lcm
from ldm_cli.training.lora_network import LoraSpec
from ldm_cli.training.lora_run import LoraJob
from tests.training.test_adapter_training import files, job  # noqa: F401

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def lcm_job(files, out: Path, **changes) -> LoraJob:  # noqa: F811
    return LoraJob(job(files, out, **{"steps": 4, "lr": 1e-2, **changes}), LoraSpec(rank=2))


def test_the_loss_is_lcms(files):  # noqa: F811
    """One loss, recomputed from diffusers' schedulers: the guided DDIM step of the teacher
    (LoRA off), the target and the student with LCMScheduler's boundary scalings."""
    from ldm_cli.text.embeddings import EmbeddingDatabase
    from ldm_cli.training.adapter_stage import AdapterTrainer
    from ldm_cli.training.lora_network import LoraNetwork

    checkpoint, _ = files
    pipe = load(checkpoint, device="cpu", dtype="fp32")
    pipe.model.requires_grad_(False)
    network = LoraNetwork(pipe.model, LoraSpec(rank=2, text_encoder=False))
    network.reset(0)
    with torch.no_grad():  # a LoRA that changes the model, so teacher and student differ
        for layer in network.layers.values():
            layer.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    network.attach(pipe.model)
    db = EmbeddingDatabase.for_model(pipe.model.text_encoder, pipe.tokenizer)
    trainer = AdapterTrainer(network, pipe, db, False, 64)
    distiller = Distiller(trainer, network, pipe, guidance=4.0)
    x0 = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(2))
    texts = ["a red circle", "a blue square"]
    loss = distiller.loss(trainer, x0, texts, torch.Generator().manual_seed(3))

    # the same draws, recomputed with diffusers' schedulers
    gen = torch.Generator().manual_seed(3)
    t = distiller.timesteps[torch.randint(0, 50, (2,), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    ddim = diffusers.DDIMScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
        }  # fmt: skip
    )
    lcm = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    a = ddim.alphas_cumprod
    noisy = ddim.add_noise(x0, noise, t)
    unet = pipe.model.unet
    cond = trainer.conditioning(texts)[0]
    uncond = trainer.conditioning(["", ""])[0]
    with torch.no_grad():
        network.enabled = False
        eps_c, eps_u = unet(noisy, t, context=cond), unet(noisy, t, context=uncond)
        network.enabled = True
        eps = eps_u + 4.0 * (eps_c - eps_u)
        s = t - 20
        x_s = torch.stack([_ddim_to(a, noisy[i], eps[i], int(t[i]), int(s[i])) for i in range(2)])
        out_s = unet(x_s, s, context=cond)
        target = torch.stack([_consistency(lcm, a, x_s[i], out_s[i], int(s[i])) for i in range(2)])
        out_t = unet(noisy, t, context=cond)
        student = torch.stack(
            [_consistency(lcm, a, noisy[i], out_t[i], int(t[i])) for i in range(2)]
        )
    expected = pseudo_huber(student, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.requires_grad


def _ddim_to(a, sample, eps, t: int, s: int) -> torch.Tensor:
    x0 = (sample - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
    return a[s].sqrt() * x0 + (1 - a[s]).sqrt() * eps


def _consistency(lcm, a, sample, eps, t: int) -> torch.Tensor:
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    x0 = (sample - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
    return c_skip * sample + c_out * x0


def test_the_lora_draws_with_lcm_and_resumes_to_the_same_bytes(files, tmp_path):  # noqa: F811
    whole = tmp_path / "whole" / "lcm.safetensors"
    whole.parent.mkdir()
    summary = train_lcm(lcm_job(files, whole), DistillOptions(cfg=3.0))
    assert summary is not None and summary["cfg"] == 3.0 and summary["layers"] > 0
    cut = tmp_path / "cut" / "lcm.safetensors"
    cut.parent.mkdir()
    assert train_lcm(lcm_job(files, cut, stop_after=3), DistillOptions(cfg=3.0)) is None
    assert train_lcm(lcm_job(files, cut, resume=True), DistillOptions(cfg=3.0)) is not None
    assert cut.read_bytes() == whole.read_bytes()

    checkpoint, _ = files
    pipe = load(checkpoint, device="cpu", dtype="fp32")
    plain = pipe.generate("a zorp", steps=4, cfg=1, seed=1, sampler="lcm", width=64, height=64)
    pipe.networks.add_lora(whole, 1.0)
    (image,) = pipe.generate("a zorp", steps=4, cfg=1, seed=1, sampler="lcm", width=64, height=64)
    assert "Sampler: LCM" in image.info["parameters"] and "Lora hashes" in image.info["parameters"]
    assert image.tobytes() != plain[0].tobytes()
