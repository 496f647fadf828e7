"""Render the shapes evaluation prompts with a pipeline and score them by pixel analysis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..data.shapes import sample_eval_prompts
from .pixel_analysis import analyse, score


def evaluate(
    pipe,
    num: int = 200,
    seed: int = 0,
    steps: int = 30,
    cfg: float = 7.5,
    sampler: str = "euler_a",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    keep_images: bool = False,
) -> dict:
    """Scores for all prompts and separately for in-distribution and held-out scenes.

    Prompt k is rendered with seed `seed + k`; the prompt set is `sample_eval_prompts(seed)`.
    """
    from ..pipeline import Request

    prompts = sample_eval_prompts(seed, num)
    size = pipe.config.default_size
    base = Request(prompt="", steps=steps, cfg=cfg, sampler=sampler, width=size, height=size)
    results, images = [], []
    for start in range(0, num, batch_size):
        chunk = prompts[start : start + batch_size]
        reqs = [replace(base, prompt=p.text, seed=seed + start + i) for i, p in enumerate(chunk)]
        for p, (_, image) in zip(chunk, pipe.render(reqs), strict=True):
            results.append({"prompt": p.text, "heldout": p.heldout, **analyse(image, p.scene)})
            if keep_images:
                images.append(image)
        if progress:
            progress(min(start + batch_size, num), num)
    report = {
        "settings": {
            "num": num,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler": sampler,
            "size": size,
            "model": pipe.name,
        },
        "all": score(results),
        "in_distribution": score([r for r in results if not r["heldout"]]),
        "heldout": score([r for r in results if r["heldout"]]),
        "results": [_plain(r) for r in results],
    }
    if keep_images:
        report["images"] = images
    return report


def _plain(value):
    """JSON-friendly copy (numpy scalars and tuples become plain Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
