"""The AUTOMATIC1111 `parameters` text a pipeline writes into each PNG for a request."""

from __future__ import annotations

from ldm_cli.core.pngmeta import GenerationParams, format_parameters
from ldm_cli.pipeline.parts import PipelineParts
from ldm_cli.pipeline.request import Request


def vae_parameters(pipe: PipelineParts) -> dict[str, str]:
    """A1111's "VAE hash" and "VAE" (written after the model's) for a --vae file."""
    if pipe.vae_file is None:
        return {}
    from ldm_cli.checkpoints.hash import model_hash

    return {"VAE hash": model_hash(pipe.vae_file), "VAE": pipe.vae_file.stem}


def parameters_text(
    pipe: PipelineParts,
    req: Request,
    extra: dict[str, str] | None = None,
    second_pass: tuple[int, int] | None = None,
) -> str:
    """`req`'s settings with the model's name and hash; `extra` adds keys such as
    "Denoising strength"; `second_pass` is the size a hires fix decoded at. Settings that change
    the image beyond A1111's own keys are written under the names --from-png reads back."""
    extra = dict(extra or {})
    clip_skip = pipe.config.text.clip_skip
    # A1111 writes it when not the last layer; it is written too where the file's own is not
    # the last layer (SD 2.x), so that --from-png (which takes no key as the file's) reads it
    if clip_skip != 1 or clip_skip != pipe.file_clip_skip:
        extra = {"Clip skip": str(clip_skip), **extra}
    extra = {**vae_parameters(pipe), **extra}
    if pipe.config.prediction != pipe.file_prediction:  # --prediction, or the probe's answer
        extra["Prediction"] = pipe.config.prediction  # read back by --from-png
    if req.eta is not None:  # A1111's key for the ancestral samplers' eta
        extra["Eta"] = f"{req.eta:g}"
    if req.rescale_cfg:
        extra["CFG rescale"] = f"{req.rescale_cfg:g}"
    if req.deep_cache > 1:
        extra["Deep cache"] = str(req.deep_cache)
    if req.token_merging:  # A1111's name for the same setting
        extra["Token merging ratio"] = f"{req.token_merging:g}"
    from ldm_cli.pipeline.vae_codec import tiling_parameters

    extra.update(tiling_parameters(pipe, req, second_pass))  # "VAE tiling: on"
    extra.update(pipe.networks.parameters(req))  # "Lora hashes", "TI hashes" (A1111)
    if req.control:
        from ldm_cli.control.units import parameters as control_parameters

        extra.update(control_parameters(req.control, req.control_mode))  # "ControlNet 0"
    return format_parameters(
        GenerationParams(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            sampler=req.sampler,
            scheduler=req.spacing,
            cfg_scale=req.cfg,
            seed=req.seed,
            width=req.width,
            height=req.height,
            model_hash=pipe.model_hash,
            model_name=pipe.name,
            extra=extra,
        )
    )
