"""`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` in the format of A1111's
sd-webui-controlnet extension, as ldm's ControlNet specs (ldm_cli.control.units).

A unit names its model as the extension lists it ("name [hash]" or "name"); it is looked up
in the server's ControlNet folder only, never as a path. Preprocessors are ldm's
(ldm_cli.control.preprocessors) under the extension's names.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ldm_cli.control.preprocessors import PREPROCESSORS
from ldm_cli.control.units import ControlSpec, check_spec
from ldm_cli.core.errors import UserError
from ldm_cli.server.images import decode_image

CONTROL_EXTENSIONS = (".safetensors", ".pth", ".bin")
# the extension's module names for ldm's preprocessors
MODULES = {
    "none": "none",
    "canny": "canny",
    "threshold": "threshold",
    "invert": "invert",
    "invert (from white bg & black line)": "invert",
    "scribble": "scribble",
    "scribble_thr": "scribble",
}
# the extension's control modes: 0, 1, 2 or their labels
_MODES = {
    "0": "balanced",
    "balanced": "balanced",
    "2": "controlnet",
    "controlnet is more important": "controlnet",
}


def control_models(folder: Path | None) -> list[Path]:
    """The ControlNet and T2I-Adapter files in `folder` and below it, sorted."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CONTROL_EXTENSIONS
    )


def find_control_model(name: str, folder: Path | None) -> Path:
    """The file of a unit's `model`: "name [hash]", "name" or "name.safetensors"."""
    wanted = name.rsplit(" [", 1)[0].strip() if name.endswith("]") else name.strip()
    for path in control_models(folder):
        if wanted in (path.name, path.stem):
            return path
    raise UserError(f"alwayson_scripts.controlnet: model {name!r} not found in {folder}")


def control_units(
    scripts: dict, folder: Path | None, fallback: Image.Image | None
) -> tuple[tuple[ControlSpec, ...], str]:
    """The ControlNet specs and control mode of a request's `alwayson_scripts`; `fallback` is
    the image a unit without one uses (img2img's init image, as the extension does)."""
    entry = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if entry is None:
        return (), "balanced"
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    if not isinstance(args, list):
        raise UserError("alwayson_scripts.controlnet.args must be a list of units")
    specs, modes = [], set()
    for k, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{k}]"
        if not isinstance(unit, dict):
            raise UserError(f"{where} must be an object")
        model = str(unit.get("model") or "None")
        if not unit.get("enabled", True) or model == "None":
            continue
        specs.append(_spec(unit, where, folder, fallback))
        mode = str(unit.get("control_mode", 0)).strip().lower()
        if mode not in _MODES:
            raise UserError(
                f"{where}.control_mode {unit.get('control_mode')!r} is not supported; use "
                "Balanced (0) or ControlNet is more important (2)"
            )
        modes.add(_MODES[mode])
    if len(modes) > 1:
        raise UserError("alwayson_scripts.controlnet: every unit must use the same control_mode")
    return tuple(specs), modes.pop() if modes else "balanced"


def _spec(unit: dict, where: str, folder: Path | None, fallback) -> ControlSpec:
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension's {"image": b64, "mask": b64}
        image = image.get("image")
    if image:
        picture = decode_image(image, f"{where}.image")
    elif fallback is not None:
        picture = fallback
    else:
        raise UserError(f"{where}.image: a control image is needed")
    module = str(unit.get("module") or "none").strip().lower()
    if module not in MODULES:
        known = ", ".join(sorted({*MODULES, *PREPROCESSORS}))
        raise UserError(
            f"{where}.module {unit.get('module')!r} is not supported; use one of {known}"
        )
    try:
        spec = ControlSpec(
            find_control_model(str(unit["model"]), folder),
            picture,
            MODULES[module],
            float(unit.get("weight", 1.0)),
            float(unit.get("guidance_start", 0.0)),
            float(unit.get("guidance_end", 1.0)),
        )
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: weight, guidance_start and guidance_end must be numbers"
        ) from None
    try:
        check_spec(spec)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    return spec
