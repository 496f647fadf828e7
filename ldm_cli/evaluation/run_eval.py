"""Render the shapes evaluation prompts with a pipeline and score them by pixel analysis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ldm_cli.data.shapes import render, sample_eval_prompts
from ldm_cli.evaluation.pixel_analysis import analyse, score


def evaluate(
    pipe,
    num: int = 200,
    seed: int = 0,
    steps: int = 30,
    cfg: float | None = None,
    sampler: str = "euler_a",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    keep_images: bool = False,
    clip=None,
    request_options: dict | None = None,
    mix: str = "grammar",
    exclude: frozenset = frozenset(),
) -> dict:
    """Scores for all prompts and separately for in-distribution and held-out scenes.

    Prompt k is rendered with seed `seed + k`; the prompt set is
    `sample_eval_prompts(seed, num, mix=mix, exclude=exclude)`: `exclude` holds the scenes of
    the model's training set (`data.shapes.training_scenes`), which are left out.
    ``cfg`` None is the checkpoint's own guidance scale, as `ldm generate` uses it.
    ``clip`` (a ``ClipScorer``) adds the in-domain CLIP score of each image and, as the
    ceiling, of the exact render of its scene. ``request_options`` are further Request fields
    (e.g. ``deep_cache``) for every image.
    """
    from ldm_cli.pipeline.request import Request

    prompts = sample_eval_prompts(seed, num, mix=mix, exclude=exclude)
    size = pipe.config.default_size
    cfg = pipe.guidance_scale(cfg)
    base = Request(
        prompt="", steps=steps, cfg=cfg, sampler=sampler, width=size, height=size,
        **(request_options or {}),
    )  # fmt: skip
    results, images = [], []
    for start in range(0, num, batch_size):
        chunk = prompts[start : start + batch_size]
        reqs = [replace(base, prompt=p.text, seed=seed + start + i) for i, p in enumerate(chunk)]
        rendered = [image for _, image in pipe.render(reqs)]
        for p, image in zip(chunk, rendered, strict=True):
            results.append({"prompt": p.text, "heldout": p.heldout, **analyse(image, p.scene)})
            if keep_images:
                images.append(image)
        if clip is not None:
            captions = [p.text for p in chunk]
            truth = [render(p.scene, size) for p in chunk]
            pairs = zip(clip(rendered, captions), clip(truth, captions), strict=True)
            for result, (generated, real) in zip(results[start:], pairs, strict=True):
                result["clip_score"], result["clip_score_real"] = generated, real
        if progress:
            progress(min(start + batch_size, num), num)
    report = {
        "settings": {
            "num": num,
            "seed": seed,
            "mix": mix,
            "excluded_training_scenes": len(exclude),
            "steps": steps,
            "cfg": cfg,
            "sampler": sampler,
            "size": size,
            "model": pipe.name,
            "clip_tower": str(clip.path) if clip is not None else None,
        },
        "all": _scores(results),
        "in_distribution": _scores([r for r in results if not r["heldout"]]),
        "heldout": _scores([r for r in results if r["heldout"]]),
        "results": [_plain(r) for r in results],
    }
    if keep_images:
        report["images"] = images
    return report


def _scores(results: list[dict]) -> dict:
    scores = score(results)
    for key in ("clip_score", "clip_score_real"):
        values = [r[key] for r in results if key in r]
        if values:
            scores[key] = round(sum(values) / len(values), 4)
    return scores


def _plain(value):
    """JSON-friendly copy (numpy scalars and tuples become plain Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
