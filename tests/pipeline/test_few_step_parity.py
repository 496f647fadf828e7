"""Few-step sampling, whole images: `ldm` with lcm, tcd and the trailing schedule against
diffusers' StableDiffusionPipeline with LCMScheduler, TCDScheduler and trailing Euler schedulers
(seeded random SD 1.x-layout weights, one file for both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pipeline.test_pipeline_parity import (  # noqa: F401 (fixtures)
    NEGATIVE,
    PROMPT,
    SEED,
    SIZE,
    assert_same_image,
    checkpoint,
    ours,
    reference_pipe,
)

diffusers = pytest.importorskip("diffusers")

CASES = [
    # (our sampler, our scheduler, steps, cfg, eta, diffusers scheduler, its options, call extras)
    ("lcm", "auto", 4, 1.5, None, "LCMScheduler", {}, {}),
    ("lcm", "auto", 1, 1.0, None, "LCMScheduler", {}, {}),
    ("tcd", "auto", 4, 1.5, None, "TCDScheduler", {}, {"eta": 0.3}),
    ("tcd", "auto", 2, 1.0, 1.0, "TCDScheduler", {}, {"eta": 1.0}),
    (
        "euler", "trailing", 4, 1.0, None,
        "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {},
    ),
    (
        "euler_a", "trailing", 2, 1.0, None,
        "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {},
    ),
]  # fmt: skip


@pytest.mark.parametrize("sampler, scheduler, steps, cfg, eta, ref_name, ref_options, call", CASES)
def test_few_step_images_match_diffusers(
    ours,  # noqa: F811
    reference_pipe,  # noqa: F811
    sampler,
    scheduler,
    steps,
    cfg,
    eta,
    ref_name,
    ref_options,
    call,
):
    pipe = reference_pipe
    pipe.scheduler = getattr(diffusers, ref_name).from_config(
        pipe.original_scheduler_config, **ref_options
    )
    expected = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        **call,
    ).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    (image,) = ours.generate(
        PROMPT,
        NEGATIVE,
        steps=steps,
        cfg=cfg,
        seed=SEED,
        sampler=sampler,
        scheduler=scheduler,
        width=SIZE,
        height=SIZE,
        eta=eta,
    )
    assert_same_image(np.asarray(image), expected)
    params = image.info["parameters"]
    label = {"lcm": "LCM", "tcd": "TCD", "euler": "Euler", "euler_a": "Euler a"}[sampler]
    assert f"Sampler: {label}," in params
    assert ("Eta: " in params) == (eta is not None)


def write_lcm_lora(path, pipe_d, seed: int = 3):
    """A U-Net-only LoRA as LCM-LoRA ships (kohya keys over diffusers' module paths, every
    attention, feed-forward, resnet convolution and time projection; alpha = rank)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe_d.unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or "norm" in name:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        weight = module.weight
        if weight.ndim == 4:
            down = torch.randn(4, *weight.shape[1:], generator=gen) * 0.3
            up = torch.randn(weight.shape[0], 4, 1, 1, generator=gen) * 0.3
        else:
            down = torch.randn(4, weight.shape[1], generator=gen) * 0.3
            up = torch.randn(weight.shape[0], 4, generator=gen) * 0.3
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        state[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


def test_an_lcm_lora_with_lcm_matches_diffusers(ours, reference_pipe, tmp_path):  # noqa: F811
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
    pipe = reference_pipe
    lora = write_lcm_lora(tmp_path / "lcm-lora-tiny.safetensors", pipe)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.original_scheduler_config)
    pipe.load_lora_weights(str(lora))
    try:
        expected = pipe(
            PROMPT, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE,
            generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
        ).images[0]  # fmt: skip
    finally:
        pipe.unload_lora_weights()
    expected = (expected * 255).round().astype(np.uint8)
    plain = ours.generate(PROMPT, steps=4, cfg=1.0, seed=SEED, sampler="lcm", width=SIZE,
                          height=SIZE)[0]  # fmt: skip
    ours.networks.add_lora(lora, 1.0)
    try:
        (image,) = ours.generate(
            PROMPT, steps=4, cfg=1.0, seed=SEED, sampler="lcm", width=SIZE, height=SIZE
        )
    finally:
        ours.networks.clear_loras()
    assert_same_image(np.asarray(image), expected)
    # the LoRA changed the picture, and the file is named in its parameters
    assert np.abs(np.asarray(plain).astype(int) - expected).max() > 10
    assert "lcm-lora-tiny" in image.info["parameters"]
