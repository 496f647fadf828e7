"""The read-only lists A1111's clients ask for on connecting: LoRAs, ControlNets and their
preprocessors, upscalers, scripts, and the empty lists of what ldm does not have (VAEs to
pick, styles, hypernetworks), so that clients that fetch them all do not stop at a 404."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from ldm_cli.server.controlnet_args import MODULES, control_models

# the hires fix's upscalers (translate.HIRES_UPSCALERS); every other name runs ldm-sr
UPSCALERS = ("ldm-sr", "Lanczos")


def lora_items(folder: Path) -> list[dict]:
    """The Lora extension's list: each LoRA file in the folder or below it."""
    from ldm_cli.core.run_folders import model_files
    from ldm_cli.networks.tags import LORA_EXTENSIONS

    found = []
    if folder.is_dir():
        for root, files in model_files(folder):
            for name in files:
                path = root / name
                if path.suffix.lower() in LORA_EXTENSIONS:
                    item = {"name": path.stem, "alias": path.stem, "metadata": {}}
                    found.append({**item, "path": str(path.resolve())})
    return found


def add_listings(app: FastAPI, lora_dir: Path, control_dir: Path | None) -> None:
    @app.get("/sdapi/v1/loras")
    def loras():
        return lora_items(lora_dir)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None,
             "scale": 4.0 if name == "ldm-sr" else None}
            for name in UPSCALERS
        ]  # fmt: skip

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return []

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return []

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks():
        return []

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return {}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def controlnet_model_list():
        from ldm_cli.control.units import model_label

        return {"model_list": [model_label(p) for p in control_models(control_dir)]}

    @app.get("/controlnet/module_list")
    def controlnet_module_list():
        return {"module_list": sorted(MODULES)}
