"""The ControlNet options shared by `ldm generate`, `img2img`, `inpaint` and `outpaint`
(ldm_cli.control). Each is repeatable: the k-th of each belongs to the k-th --control, and one
given once applies to every --control. torch is not imported here."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError

CONTROL = typer.Option(
    [],
    "--control",
    help="A ControlNet or T2I-Adapter file: lllyasviel's control_*.pth/.safetensors (original "
    "layout, control_model.*), a diffusers ControlNet (file or folder; how SDXL ones ship), "
    "a TencentARC T2I-Adapter, or weights/ldm-shapes-canny.safetensors for the embedded model. "
    "Repeatable: their residuals add up, each with its weight.",
)
CONTROL_IMAGE = typer.Option(
    [],
    "--control-image",
    help="The control image of each --control, resized to the output size (same aspect "
    "ratio). Depth, pose and other maps that need a model to make are given ready-made.",
)
PREPROCESS = typer.Option(
    [],
    "--preprocess",
    help="Make the control map from --control-image: none (the image is the map; default), "
    "canny, threshold, scribble, invert. Depth, OpenPose and the like need model weights: "
    "make those maps with another tool and pass them with none.",
)
CONTROL_WEIGHT = typer.Option(
    [], "--control-weight", help="Weight of each ControlNet's residuals, 0..2 (default 1)."
)
CONTROL_START = typer.Option(
    [],
    "--control-start",
    help="Fraction of the steps before which the ControlNet is off (default 0; diffusers' "
    "control_guidance_start).",
)
CONTROL_END = typer.Option(
    [],
    "--control-end",
    help="Fraction of the steps after which the ControlNet is off (default 1).",
)
CONTROL_MODE = typer.Option(
    "balanced",
    "--control-mode",
    help="balanced, or controlnet (A1111's 'ControlNet is more important', diffusers' guess "
    "mode: the ControlNets act on the prompt's half of the CFG batch only, shallow layers "
    "weaker, so the control wins over the prompt; works even without a prompt).",
)


def control_options(
    control: list[Path],
    images: list[Path],
    preprocess: list[str],
    weights: list[float],
    starts: list[float],
    ends: list[float],
    mode: str,
) -> dict:
    """The request options (`control`, `control_mode`) the command line asks for, checked:
    files, images, counts and ranges; {} without --control."""
    others = {
        "--control-image": images, "--preprocess": preprocess, "--control-weight": weights,
        "--control-start": starts, "--control-end": ends,
    }  # fmt: skip
    if not control:
        given = [name for name, values in others.items() if values]
        if given or mode != "balanced":
            raise UserError(f"{', '.join(given) or '--control-mode'} needs --control FILE")
        return {}
    from ldm_cli.control.units import ControlSpec, check_control_mode, check_spec

    if len(images) != len(control):
        raise UserError(
            f"{len(control)} --control but {len(images)} --control-image: give one image for "
            "each ControlNet"
        )
    k = len(control)
    per_unit = {}
    for name, values in others.items():
        if name == "--control-image":
            continue
        if len(values) not in (0, 1, k):
            raise UserError(f"{len(values)} {name} for {k} --control: give one, or one each")
        per_unit[name] = values * k if len(values) == 1 else values
    specs = []
    for i in range(k):
        options = {}
        for name, field in (
            ("--preprocess", "preprocess"), ("--control-weight", "weight"),
            ("--control-start", "start"), ("--control-end", "end"),
        ):  # fmt: skip
            if per_unit[name]:
                options[field] = per_unit[name][i]
        spec = ControlSpec(control[i], images[i], **options)
        check_spec(spec, i)
        specs.append(spec)
    check_control_mode(mode)
    return {"control": tuple(specs), "control_mode": mode}


def check_control_files(pipe, request) -> None:
    """Build each ControlNet for the loaded model and make each control map at the request's
    size, as a run does, so a wrong family, layout, scale or aspect ratio fails before anything
    renders."""
    from ldm_cli.control.apply import control_units

    if not request.control:
        return  # nothing to check (and a flow model has no U-Net config to check against)
    size = (request.width, request.height)
    unet, factor = pipe.config.unet, pipe.latent_factor
    control_units(request.control, pipe.control_nets, unet, size, pipe.device, pipe.dtype, factor)
