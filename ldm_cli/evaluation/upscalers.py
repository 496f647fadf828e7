"""The upscaler table of docs/upscaling.md: bicubic, Lanczos, the embedded super-resolution
network (ldm-sr) and the embedded x4 diffusion model, on held-out photos at x4 and on shapes
scenes at 16->64, 32->128 and 64->256 px.

PSNR and SSIM are scikit-image's (`ldm_cli.core.image_metrics`), against the original; the colour
shift is the largest per-channel difference of mean colours. On shapes scenes the template
check of `ldm eval` (`pixel_analysis.analyse`) reads every object's colour and shape off each
result: "shapes kept" is the fraction of objects whose shape it finds as in the original.

    python -m ldm_cli.evaluation.upscalers --json weights/upscalers.json --pictures docs/images
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_cli.core.image_metrics import colour_shift, psnr, ssim
from ldm_cli.data.photos import HELDOUT_PHOTOS, heldout_pair
from ldm_cli.pipeline.tasks.image_upscaler import ImageUpscaler, upscale_image

PHOTO_SCALE = 4
SHAPES_SIDES = (64, 128, 256)  # high-res sides; the inputs are a quarter of that
UNSEEN_SEED = 987_654  # the embedded models were trained on seed 0's scenes
DIFFUSION_STEPS = 30


@dataclass
class Example:
    name: str
    original: Image.Image
    low: Image.Image
    caption: str = ""
    scene: object = None  # ldm_cli.data.shapes.Scene for shapes scenes


Method = Callable[[Example, int], Image.Image]


def shrink(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BICUBIC)


def photo_examples() -> list[Example]:
    return [Example(name, *heldout_pair(name, PHOTO_SCALE)) for name in HELDOUT_PHOTOS]


def shapes_examples(side: int, count: int) -> list[Example]:
    from ldm_cli.data.shapes import render, training_scene
    from ldm_cli.data.shapes_writer import training_example

    out = []
    for i in range(count):
        _, caption = training_example(UNSEEN_SEED, i, 64)
        scene, rng = training_scene(UNSEEN_SEED, i)
        original = render(scene, side, rng)
        out.append(Example(f"scene {i}", original, shrink(original, 4), caption, scene))
    return out


def resampler(kind: Image.Resampling) -> Method:
    def run(example: Example, index: int) -> Image.Image:
        return example.low.resize(example.original.size, kind)

    return run


def network_method() -> Method:
    from ldm_cli.pipeline.tasks.image_upscaler import load_embedded_upscaler

    network = load_embedded_upscaler(PHOTO_SCALE, "cpu")

    def run(example: Example, index: int) -> Image.Image:
        return network.upscale(example.low, PHOTO_SCALE)

    return run


def diffusion_method(prompted: bool, color_fix: str = "auto") -> Method:
    from ldm_cli.core.embedded import default_upscaler_path
    from ldm_cli.pipeline.load import load
    from ldm_cli.pipeline.tasks.upscale import upscale

    pipe = load(default_upscaler_path(), device="cpu", dtype="fp32")

    def run(example: Example, index: int) -> Image.Image:
        prompt = example.caption if prompted else ""
        (image,) = upscale(
            pipe, example.low, prompt, steps=DIFFUSION_STEPS, seed=index, color_fix=color_fix
        )
        return image

    return run


def shapes_kept(result: Image.Image, example: Example) -> tuple[int, int]:
    """(objects whose shape and colour the template check finds, objects)."""
    from ldm_cli.evaluation.pixel_analysis import analyse

    objects = analyse(result, example.scene)["objects"]
    return sum(o["shape_ok"] and o["colour_ok"] for o in objects), len(objects)


def evaluate_set(examples: list[Example], methods: dict[str, Method]) -> tuple[dict, dict]:
    """Per method: mean PSNR, SSIM, colour shift, gain over bicubic (mean and worst) and, on
    scenes, shapes kept; plus the results, for pictures."""
    rows, images = {}, {}
    for name, method in methods.items():
        results = [method(example, i) for i, example in enumerate(examples)]
        images[name] = results
        psnrs = [psnr(r, e.original) for r, e in zip(results, examples, strict=True)]
        row = {
            "psnr_db": round(float(np.mean(psnrs)), 2),
            "ssim": round(
                float(
                    np.mean([ssim(r, e.original) for r, e in zip(results, examples, strict=True)])
                ),
                4,
            ),
            "colour_shift": round(
                max(colour_shift(r, e.original) for r, e in zip(results, examples, strict=True)), 2
            ),
            "per_image_psnr_db": [round(v, 2) for v in psnrs],
        }
        if examples[0].scene is not None:
            kept = [shapes_kept(r, e) for r, e in zip(results, examples, strict=True)]
            row["shapes_kept"] = round(sum(k for k, _ in kept) / sum(n for _, n in kept), 3)
        rows[name] = row
    if "bicubic" in rows:
        base = rows["bicubic"]["per_image_psnr_db"]
        for row in rows.values():
            gains = [a - b for a, b in zip(row["per_image_psnr_db"], base, strict=True)]
            row["gain_db"] = round(float(np.mean(gains)), 2)
            row["worst_gain_db"] = round(float(np.min(gains)), 2)
    if examples[0].scene is not None:
        kept = [shapes_kept(e.original, e) for e in examples]
        rows["original"] = {
            "shapes_kept": round(sum(k for k, _ in kept) / sum(n for _, n in kept), 3)
        }
    return rows, images


def picture(
    examples: list[Example], images: dict[str, list[Image.Image]], path: Path, count: int
) -> None:
    """Columns: the original, then each method; one row per example (the first `count`)."""
    names = ["original", *images]
    cell = examples[0].original.size
    sheet = Image.new("RGB", (cell[0] * len(names), cell[1] * min(count, len(examples))), "white")
    for row, example in enumerate(examples[:count]):
        for col, name in enumerate(names):
            image = example.original if name == "original" else images[name][row]
            sheet.paste(image.resize(cell), (col * cell[0], row * cell[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=88)  # JPEG for the photos (PNG would be 2.9 MB); PNG ignores it


def run(count: int, diffusion: bool, pictures: Path | None) -> dict:
    common = {
        "bicubic": resampler(Image.Resampling.BICUBIC),
        "lanczos": resampler(Image.Resampling.LANCZOS),
        "ldm-sr": network_method(),
    }
    report = {}
    photos = photo_examples()
    report["photos x4"], images = evaluate_set(photos, common)
    if pictures is not None:
        crops = [_centre_crop(e, 96) for e in photos]
        cropped = {
            k: [_crop_like(r, e, c) for r, e, c in zip(v, photos, crops, strict=True)]
            for k, v in images.items()
        }
        picture(crops, cropped, pictures / "upscale-photos.jpg", len(photos))
    methods = dict(common)
    if diffusion:
        methods["ldm-shapes-x4 (caption)"] = diffusion_method(True)
        methods["ldm-shapes-x4 (no prompt)"] = diffusion_method(False)
        methods["ldm-shapes-x4 (caption, no colour fix)"] = diffusion_method(True, "none")
    for side in SHAPES_SIDES:
        examples = shapes_examples(side, count)
        key = f"shapes {side // 4}->{side}"
        report[key], images = evaluate_set(examples, methods)
        if pictures is not None:
            picture(examples, images, pictures / f"upscale-shapes-{side}.png", 3)
    return report


def _centre_crop(example: Example, low_side: int) -> Example:
    """The middle low_side x low_side of the input and the matching part of the original."""
    lw, lh = example.low.size
    left, top = (lw - low_side) // 2, (lh - low_side) // 2
    low = example.low.crop((left, top, left + low_side, top + low_side))
    s = PHOTO_SCALE
    box = (left * s, top * s, (left + low_side) * s, (top + low_side) * s)
    return Example(example.name, example.original.crop(box), low)


def _crop_like(result: Image.Image, example: Example, crop: Example) -> Image.Image:
    lw, lh = example.low.size
    side = crop.low.width
    left, top = (lw - side) // 2, (lh - side) // 2
    s = PHOTO_SCALE
    return result.crop((left * s, top * s, (left + side) * s, (top + side) * s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--pictures", type=Path, help="write comparison sheets into this folder")
    parser.add_argument("--count", type=int, default=24, help="shapes scenes per size")
    parser.add_argument("--no-diffusion", action="store_true", help="leave the x4 model out")
    args = parser.parse_args(argv)
    report = run(args.count, not args.no_diffusion, args.pictures)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    for key, rows in report.items():
        print(key)
        for name, row in rows.items():
            shown = {k: v for k, v in row.items() if k != "per_image_psnr_db"}
            print(f"  {name:28s} {shown}")


if __name__ == "__main__":
    main()


def measure(upscaled: Image.Image, original: Image.Image) -> dict:
    return {
        "psnr_db": round(psnr(upscaled, original), 3),
        "ssim": round(ssim(upscaled, original), 4),
        "colour_shift": round(colour_shift(upscaled, original), 3),
    }


def evaluate_photos(upscaler: ImageUpscaler, names=HELDOUT_PHOTOS) -> dict:
    """The network against bicubic on held-out photos shrunk by its scale (bicubic)."""
    scale = upscaler.scale
    rows = {}
    for name in names:
        original, low = heldout_pair(name, scale)
        ours = measure(upscale_image(upscaler, low), original)
        bicubic = measure(low.resize(original.size, Image.Resampling.BICUBIC), original)
        rows[name] = {"network": ours, "bicubic": bicubic}
    gains = [r["network"]["psnr_db"] - r["bicubic"]["psnr_db"] for r in rows.values()]
    return {
        "images": rows,
        "mean_gain_db": round(float(np.mean(gains)), 3),
        "worst_gain_db": round(float(np.min(gains)), 3),
        "max_colour_shift": max(r["network"]["colour_shift"] for r in rows.values()),
    }
