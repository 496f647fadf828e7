"""The bodies A1111 answers with: the images and `info` of a finished job, the parameters of
a PNG (/png-info) and /progress with its preview image."""

from __future__ import annotations

import json
import time

from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import SAMPLER_LABELS, SCHEDULER_LABELS, parse_parameters
from ldm_cli.server.images import encode_plain_png, encode_png
from ldm_cli.server.jobs import Job


def images_response(body, pairs: list, pipe_name: str, pipe_hash: str | None) -> dict:
    """A1111's TextToImageResponse: base64 PNGs (the CLI's files), the request as
    `parameters`, and `info`, the JSON string of its Processed.js()."""
    requests = [req for req, _ in pairs]
    images = [image for _, image in pairs]
    head = requests[0] if requests else None
    params = body.model_dump()
    if "init_images" in params and not params.get("include_init_images"):
        params["init_images"] = params["mask"] = None
    seeds = [req.seed for req in requests]
    infotexts = [image.info.get("parameters", "") for image in images]
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(pairs),
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(pairs),
        "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(pairs), "subseed_strength": 0,
        "width": images[0].width if images else body.width,
        "height": images[0].height if images else body.height,
        "sampler_name": SAMPLER_LABELS.get(head.sampler) if head else None,
        "scheduler": SCHEDULER_LABELS.get(head.spacing) if head else None,
        "cfg_scale": head.cfg if head else body.cfg_scale,
        "steps": head.steps if head else body.steps,
        "batch_size": body.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": pipe_name, "sd_model_hash": pipe_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": body.denoising_strength,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": body.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": _clip_skip(infotexts), "is_using_inpainting_conditioning": False,
        "version": _version(),
    }  # fmt: skip
    return {
        "images": [encode_png(image) for image in images] if body.send_images else [],
        "parameters": params,
        "info": json.dumps(info),
    }


def _clip_skip(infotexts: list[str]) -> int:
    """The text encoder layer the images were made with, as their parameters text says."""
    try:
        return int(parse_parameters(infotexts[0]).extra.get("Clip skip", 1)) if infotexts else 1
    except (UserError, ValueError):
        return 1


def _version() -> str:
    from ldm_cli import __version__

    return f"ldm {__version__}"


def png_info(image: Image.Image) -> dict:
    """A1111's PNGInfoResponse: the parameters text, the other text chunks, and the text
    parsed into A1111's keys ("Prompt", "Steps", "Size-1", ...)."""
    text = image.info.get("parameters")
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    try:
        p = parse_parameters(text)
    except UserError:
        return {"info": text, "items": items, "parameters": {}}
    parsed = {
        "Prompt": p.prompt, "Negative prompt": p.negative_prompt, "Steps": str(p.steps),
        "Sampler": SAMPLER_LABELS[p.sampler], "Schedule type": SCHEDULER_LABELS[p.scheduler],
        "CFG scale": f"{p.cfg_scale:g}", "Seed": str(p.seed), "Size-1": str(p.width),
        "Size-2": str(p.height),
    }  # fmt: skip
    if p.model_hash:
        parsed["Model hash"] = p.model_hash
    if p.model_name:
        parsed["Model"] = p.model_name
    parsed.update(p.extra)
    return {"info": text, "items": items, "parameters": parsed}


def progress(job: Job | None, queued: int, position: int | None, skip_image: bool) -> dict:
    """A1111's ProgressResponse for `job` (None: idle); `state` adds where a job waits
    (`queue_size`, and `queue_position` of the job asked about: 0 running, k k-th in line)."""
    state = {
        "skipped": False, "interrupted": bool(job and job.stop.is_set()),
        "stopping_generation": False, "job": job.id if job else "",
        "job_count": job.work.batches if job else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started))
        if job and job.started else "0",
        "job_no": job.batch if job else 0, "sampling_step": job.step if job else 0,
        "sampling_steps": job.steps if job else 0, "queue_size": queued,
        "queue_position": position,
    }  # fmt: skip
    if job is None or job.started is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None}  # fmt: skip
    done = max(job.fraction, 0.01)
    elapsed = time.time() - job.started
    image = None
    latest, pipe = job.latest, job.pipe
    if latest is not None and pipe is not None and not skip_image:
        image = encode_plain_png(_preview(pipe, latest))
    return {
        "progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed, "state": state,
        "current_image": image, "textinfo": None,
    }  # fmt: skip


def _preview(pipe, x0) -> Image.Image:
    from ldm_cli.runtime.preview import preview_image

    tiny = getattr(pipe, "tiny_vae", None)
    return preview_image(x0, None if tiny is not None else pipe.preview_matrix, tiny)
