"""`ldm generate --from-png IMAGE`: the settings of a text-to-image PNG's parameters text as a
job, with the options given on the command line taking precedence over the PNG's.

A PNG made by img2img, inpaint, outpaint or upscale is refused: its image came from an input
image that the PNG does not hold, so a text-to-image render would be a different picture.
"""

from __future__ import annotations

from pathlib import Path

from ldm_cli.core.errors import UserError

# keys that only the image-to-image commands write (A1111's names where it has them)
IMAGE_INPUT_KEYS = {
    "Mask blur": "inpaint",
    "Outpaint": "outpaint",
    "Noise level": "upscale",
}

POSTPROCESS_KEY = "Postprocess upscaler:"

# job options that `ldm generate` options of the same name override when given
OVERRIDABLE = frozenset(
    {
        "negative_prompt", "steps", "cfg", "seed", "sampler", "scheduler", "width", "height",
        "num_images", "batch_size", "rescale_cfg", "deep_cache", "token_merging", "guidance",
        "eta",
    }
)  # fmt: skip


def png_job(from_png: Path) -> dict:
    """The job of a text-to-image PNG: prompt, options, model hash, hires fix, clip skip and
    VAE tiling as it was made."""
    from ldm_cli.core.pngmeta import params_from_png, read_parameters
    from ldm_cli.pipeline.tasks.hires import hires_from_parameters

    text = read_parameters(from_png) or ""
    if POSTPROCESS_KEY in text:  # A1111's extras: no prompt, no steps
        raise UserError(
            f"{from_png} was made by `ldm upscale` (or A1111's extras) from an input image; "
            "--from-png re-renders text-to-image PNGs only"
        )
    p = params_from_png(from_png)
    _check_text_to_image(from_png, p.extra)
    options = {
        "negative_prompt": p.negative_prompt,
        "steps": p.steps,
        "cfg": p.cfg_scale,
        "seed": p.seed,
        "sampler": p.sampler,
        "scheduler": p.scheduler,
        "width": p.width,
        "height": p.height,
        "num_images": 1,
        "batch_size": 1,
    }
    hires = hires_from_parameters(p.extra)
    prediction = p.extra.get("Prediction")  # written where the file does not settle it
    if prediction not in (None, "eps", "v"):
        raise UserError(f"{from_png}: bad 'Prediction' value {prediction!r}")
    skip = p.extra.get("Clip skip", "")
    clip_skip = int(skip) if skip.isdigit() else None
    if "CFG rescale" in p.extra:  # written by --rescale-cfg
        try:
            options["rescale_cfg"] = float(p.extra["CFG rescale"])
        except ValueError:
            raise UserError(f"{from_png}: bad 'CFG rescale' value") from None
    if "Distilled CFG Scale" in p.extra:  # FLUX dev's --guidance (Forge's key)
        try:
            options["guidance"] = float(p.extra["Distilled CFG Scale"])
        except ValueError:
            raise UserError(f"{from_png}: bad 'Distilled CFG Scale' value") from None
    if "Eta" in p.extra:  # --eta (A1111's key)
        try:
            options["eta"] = float(p.extra["Eta"])
        except ValueError:
            raise UserError(f"{from_png}: bad 'Eta' value") from None
    if "Deep cache" in p.extra:  # written by --deep-cache
        if not p.extra["Deep cache"].isdigit():
            raise UserError(f"{from_png}: bad 'Deep cache' value")
        options["deep_cache"] = int(p.extra["Deep cache"])
    if "Token merging ratio" in p.extra:  # written by --token-merging
        try:
            options["token_merging"] = float(p.extra["Token merging ratio"])
        except ValueError:
            raise UserError(f"{from_png}: bad 'Token merging ratio' value") from None
    job = {"prompt": p.prompt, "options": options, "model_hash": p.model_hash, "hires": hires}
    job["vae"] = (p.extra["VAE"], p.extra.get("VAE hash")) if "VAE" in p.extra else None
    # ControlNet units (A1111's extension's "ControlNet N" keys): their images are not in the PNG
    job["controlnets"] = [k for k in p.extra if k.startswith("ControlNet ")]
    tiling = p.extra.get("VAE tiling", "off")  # the mode that tiled it: on or auto
    tiling = tiling if tiling in ("on", "auto") else "off"
    refiner = p.extra.get("Refiner")  # "name [hash]", with "Refiner switch at"
    try:
        switch = float(p.extra["Refiner switch at"]) if refiner else None
    except (KeyError, ValueError):
        raise UserError(f"{from_png}: bad or missing 'Refiner switch at' value") from None
    return {
        **job, "clip_skip": clip_skip, "vae_tiling": tiling, "prediction": prediction,
        "refiner": refiner, "refiner_switch": switch,
    }  # fmt: skip


def _check_text_to_image(path: Path, extra: dict[str, str]) -> None:
    made_by = next((command for key, command in IMAGE_INPUT_KEYS.items() if key in extra), None)
    if made_by is None and "Denoising strength" in extra and "Hires upscale" not in extra:
        made_by = "img2img"
    if made_by is not None:
        raise UserError(
            f"{path} was made by `ldm {made_by}` (or A1111's equivalent) from an input image; "
            "--from-png re-renders text-to-image PNGs only"
        )


def command_line_wins(job: dict, given: set[str]) -> dict:
    """`job` without the options that the command line gives (`given`: parameter names)."""
    options = {k: v for k, v in job["options"].items() if k not in given}
    return {**job, "options": options}


def vae_warning(from_png: Path, job: dict, pipe) -> str | None:
    """What to tell when the PNG was decoded with another VAE than this run's (`--vae`)."""
    if job.get("vae") is None:
        return None
    from ldm_cli.checkpoints.hash import model_hash

    name, wanted = job["vae"]
    if pipe.vae_file is not None and wanted in (None, model_hash(pipe.vae_file)):
        return None
    label = f"{name} [{wanted}]" if wanted else name
    return f"warning: {from_png} was decoded with the VAE {label}; give it with --vae FILE"
