"""What the opt-in, image-changing speed-ups (--deep-cache, --token-merging) buy and cost.

    python -m ldm_cli.bench.speedups [--num 64] [--sd15-size 512] [--steps 30]

Quality, on the embedded model (the one model here whose images can be judged): the `ldm eval`
scores of each setting, and how far its images are from the exact ones (PSNR against the
images made without any speed-up, same prompts and seeds). Speed, on a random full-size SD 1.5
checkpoint (bench-cache, as `make bench` builds it) at --sd15-size: seconds per sampling step
(CFG batch of 2) and how far the decoded image moves (random weights make no picture worth
judging, but the distance still tells how much each setting changes). Prints markdown tables
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ldm_cli.core.image_metrics import psnr

SETTINGS: list[tuple[str, dict]] = [
    ("off", {}),
    ("--deep-cache 2", {"deep_cache": 2}),
    ("--deep-cache 3", {"deep_cache": 3}),
    ("--deep-cache 5", {"deep_cache": 5}),
    ("--token-merging 0.3", {"token_merging": 0.3}),
    ("--token-merging 0.5", {"token_merging": 0.5}),
    ("--deep-cache 3 --token-merging 0.5", {"deep_cache": 3, "token_merging": 0.5}),
]


def fidelity(images: list, reference: list) -> str:
    value = psnr(images, reference)
    return "identical" if value == math.inf else f"{value:.1f} dB"


def quality_rows(num: int, steps: int) -> list[str]:
    import ldm_cli
    from ldm_cli.evaluation.run_eval import evaluate

    pipe = ldm_cli.load(None, device="cpu", dtype="fp32")
    rows, reference = [], None
    for name, options in SETTINGS:
        report = evaluate(
            pipe, num=num, steps=steps, keep_images=True, request_options=options, mix="half"
        )
        images = report["images"]
        reference = images if reference is None else reference
        s = report["all"]
        rows.append(
            f"| {name} | {s['colour']:.1%} | {s['shape']:.1%} | {s['place']:.1%} | "
            f"{s['size']:.1%} | {s['scene']:.1%} | {fidelity(images, reference)} |"
        )
        print(rows[-1], flush=True)
    return rows


def speed_rows(size: int, steps: int, cache: Path) -> list[str]:
    import ldm_cli
    from ldm_cli.bench.__main__ import checkpoint
    from ldm_cli.pipeline.request import Request

    pipe = ldm_cli.load(checkpoint(cache), device="cpu", dtype="fp32")
    base_request = Request("a photo", steps=steps, seed=0, sampler="euler", width=size, height=size)
    rows, base, reference = [], None, None
    for name, options in SETTINGS:
        request = replace(base_request, **options)
        cond, uncond = pipe.conditioning([request])
        noise, gen = pipe.initial_noise(0, size, size)
        times = []

        def on_step(i, total, times=times):
            times.append(time.perf_counter())

        started = time.perf_counter()
        latents = pipe.sample(cond, uncond, noise, [gen], request, progress=on_step)
        steps_s = np.diff([started, *times])
        mean = float(np.mean(steps_s))
        base = mean if base is None else base
        images = pipe.decode(latents)
        reference = images if reference is None else reference
        rows.append(
            f"| {name} | {float(np.median(steps_s)):.2f} | {mean:.2f} | {base / mean:.2f}x "
            f"| {fidelity(images, reference)} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num", type=int, default=64, help="embedded-model eval prompts")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sd15-size", type=int, default=512, help="0: skip the SD 1.5 timing")
    ap.add_argument("--sd15-steps", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parents[2] / "bench-cache")
    args = ap.parse_args()
    lines = [
        f"Embedded model, `ldm eval --num {args.num}` defaults ({args.steps} steps euler_a, "
        "cfg 7.5); fidelity: PSNR against the images made without a speed-up.",
        "",
        "| setting | colour | shape | place | size | scene | fidelity |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    lines += quality_rows(args.num, args.steps)
    if args.sd15_size:
        head = [
            "",
            f"Random SD 1.5 checkpoint, {args.sd15_size}x{args.sd15_size}, {args.sd15_steps} "
            f"euler steps, CFG batch 2, fp32 CPU, {torch.get_num_threads()} threads:",
            "",
            "| setting | median s/step | mean s/step | speed-up | PSNR vs off |",
            "|---|---|---|---|---|",
        ]
        print("\n".join(head), flush=True)
        lines += head + speed_rows(args.sd15_size, args.sd15_steps, args.cache)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
