"""One benchmark measurement in a fresh process: `python -m ldm_cli.bench.worker TOOL ...`.

Prints one JSON line of phase timings. Process start is taken from LDM_BENCH_T0 (set by the
parent just before it spawns us), so interpreter start-up and imports count as they do for
a user.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak
    from ldm_cli.bench.vae_2048 import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def _clock(device: str):
    """time.time() after the device has finished its queued work."""
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.time()

    return now


def run_ldm(args) -> dict:
    import torch

    from ldm_cli.core.pngmeta import write_png
    from ldm_cli.pipeline.load import load
    from ldm_cli.pipeline.request import Request

    now = _clock(args.device)
    t = {"imported": time.time()}
    compiled = dict(compile=args.tool == "ldm-compile", cuda_graphs=args.tool == "ldm-cuda-graphs")
    pipe = load(args.model, device=args.device, dtype=args.dtype, **compiled)
    t["loaded"] = now()
    req = Request(
        PROMPT, NEGATIVE, args.steps, 7.5, args.seed, "euler", "normal", args.size, args.size
    )
    if args.controlnet:
        from dataclasses import replace

        from ldm_cli.control.units import ControlSpec

        req = replace(req, control=(ControlSpec(Path(args.controlnet), control_image(args.size)),))
    with torch.inference_mode():
        cond = pipe.encode_prompts([PROMPT])
        uncond = pipe.encode_prompts([NEGATIVE])
        t["encoded"] = now()
        # as `ldm generate` does on its last batch (Pipeline.render(last=True))
        pipe.release("text_encoder")
        steps = []
        noise, gen = pipe.initial_noise(args.seed, args.size, args.size)
        latents = pipe.sample(
            cond, uncond, noise, [gen], req, progress=lambda i, n: steps.append(now())
        )
        t["sampled"] = now()
        pipe.release_unet_before_decoding(latents)
        (image,) = pipe.decode(latents)
    t["decoded"] = now()
    write_png(image, args.png, pipe.parameters_text(req))
    t["written"] = time.time()
    return {**t, "step_times": steps}


def control_image(size: int):
    """The control map of the ControlNet rows: white circles on black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for k in range(3):
        r = size // 8
        x, y = size // 4 + k * size // 4, size // 2
        draw.ellipse((x - r, y - r, x + r, y + r), outline="white", width=max(1, size // 64))
    return image


def diffusers_controlnet(path: str, dtype):
    """diffusers' ControlNetModel (its defaults with SD 1.5's 768-wide text: lllyasviel's
    config) with an original-layout file's weights, converted by its own single-file code (no
    config download)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    model = ControlNetModel(cross_attention_dim=768)
    state = convert_controlnet_checkpoint(load_file(path), dict(model.config))
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def run_diffusers(args) -> dict:
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    now = _clock(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t = {"imported": time.time()}
    pipe = StableDiffusionPipeline.from_single_file(
        args.model,
        config=args.config,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=dtype,
    ).to(args.device)
    extra = {}
    if args.controlnet:
        controlnet = diffusers_controlnet(args.controlnet, dtype).to(args.device)
        pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
        extra["image"] = control_image(args.size)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    t["loaded"] = now()
    with torch.inference_mode():
        cond, uncond = pipe.encode_prompt(PROMPT, args.device, 1, True, NEGATIVE)
        t["encoded"] = now()
        steps = []

        def on_step(p, i, ts, kw):
            steps.append(now())
            return kw

        latents = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            output_type="latent",
            callback_on_step_end=on_step,
            **extra,
        ).images
        t["sampled"] = now()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    t["decoded"] = now()
    image.save(args.png)
    t["written"] = time.time()
    return {**t, "step_times": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    # ldm-winograd / ldm-conv2d: ldm with its Winograd 3x3 convolutions forced on ("auto") or
    # off, whichever is not this CPU's default, to show what they buy
    # ldm-compile / ldm-cuda-graphs: ldm with --compile / --cuda-graphs
    tools = ["ldm", "ldm-winograd", "ldm-conv2d", "ldm-compile", "ldm-cuda-graphs", "diffusers"]
    ap.add_argument("tool", choices=tools)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", help="diffusers config folder (for from_single_file)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--png", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--controlnet", help="an original-layout SD 1.5 ControlNet file to run with")
    args = ap.parse_args()
    t0 = float(os.environ.get("LDM_BENCH_T0", time.time()))
    if args.tool in ("ldm-winograd", "ldm-conv2d"):
        from ldm_cli.ops.winograd_conv import set_winograd

        set_winograd("auto" if args.tool == "ldm-winograd" else "never")
    if args.tool != "diffusers":  # as the `ldm` commands do at start
        from ldm_cli.checkpoints.hash import hash_in_background
        from ldm_cli.ops.allocator import keep_freed_memory

        keep_freed_memory()
        hash_in_background(args.model)
    t = run_diffusers(args) if args.tool == "diffusers" else run_ldm(args)
    steps = t.pop("step_times")
    per_step = [b - a for a, b in zip([t["encoded"], *steps[:-1]], steps, strict=True)]
    # the first step carries one-off warm-up; report the median of the rest when possible
    body = sorted(per_step[1:] or per_step)
    result = {
        "tool": args.tool,
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "import_s": t["imported"] - t0,
        "load_s": t["loaded"] - t["imported"],
        "encode_s": t["encoded"] - t["loaded"],
        "unet_step_s": body[len(body) // 2],
        "sample_s": t["sampled"] - t["encoded"],
        "decode_s": t["decoded"] - t["sampled"],
        "end_to_end_s": t["written"] - t0,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if args.device == "cuda":
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
