"""`ldm train --base CKPT` for text-to-image configs: fine-tune a U-Net on a trained model.

The base checkpoint's VAE and text encoder are used as they are, frozen (stages 1 and 2 are
not run), and the U-Net starts from the base's. The config's U-Net may be the base's or a
grown one: every tensor of the base must fit a tensor of the same name and shape, and what the
base lacks must be whole modules (for example attention added at a level that had none). The
new modules keep the zero-initialised output layers of a fresh U-Net, so the grown model starts
as exactly the base model and training only adds to it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ldm_cli.core.config import ModelConfig
from ldm_cli.core.errors import UserError


@dataclass
class FineTuneBase:
    path: Path
    config: ModelConfig  # the training config around the base's VAE and text encoder
    vae: object  # AutoencoderKL, frozen
    text_encoder: object  # CLIPTextEncoder, frozen
    unet: object  # UNetModel: where the U-Net stage starts

    def record(self, run_dir: Path) -> None:
        """Note the base in metrics.json and put its CLIP image tower (for `ldm eval`), if it
        has one, into the run folder, where a run trained from scratch keeps its own."""
        from ldm_cli.evaluation.clip_score import find_clip_tower
        from ldm_cli.training.run_log import merge_json
        from ldm_cli.training.run_settings import path_key
        from ldm_cli.training.text_stage import TOWER_FILE

        tower = find_clip_tower(self.path)
        if tower is not None and tower.resolve() != (run_dir / TOWER_FILE).resolve():
            shutil.copyfile(tower, run_dir / TOWER_FILE)
        merge_json(run_dir / "metrics.json", {"base": {"path": path_key(self.path)}})


def base_config(cfg: ModelConfig, base: ModelConfig) -> ModelConfig:
    """``cfg`` with the base's VAE and text encoder; the U-Net must fit them. Which text layer
    conditions the U-Net (``clip_skip``) is the config's: it belongs to the U-Net being trained."""
    from ldm_cli.checkpoints.detect import is_upscaler_unet

    if base.conditioner:
        raise UserError(
            f"--base is an {base.family} model (SDXL layout); ldm train fine-tunes "
            "SD 1.x/2.x-shaped models only"
        )
    if is_upscaler_unet(base.unet):
        raise UserError("--base is an x4 upscaler; a text-to-image config needs another base")
    for whose, unet in (("the base's", base.unet), ("the config's", cfg.unet)):
        if unet.in_channels != base.vae.embed_dim:
            raise UserError(
                "ldm train trains plain text-to-image U-Nets, whose input is the latent alone; "
                f"{whose} takes {unet.in_channels} channels (an inpainting layout?)"
            )
    if cfg.unet.context_dim != base.text.hidden_size:
        raise UserError(
            f"the config's U-Net reads {cfg.unet.context_dim}-wide text features but the base's "
            f"text encoder gives {base.text.hidden_size}"
        )
    if cfg.unet.out_channels != base.vae.embed_dim:
        raise UserError(
            f"the config's U-Net makes {cfg.unet.out_channels} latent channels but the base's "
            f"VAE has {base.vae.embed_dim}"
        )
    return cfg.with_(vae=base.vae, text=replace(base.text, clip_skip=cfg.text.clip_skip))


def load_fine_tune_base(path: Path, cfg: ModelConfig) -> FineTuneBase:
    import torch

    from ldm_cli.checkpoints.detect import detect_config
    from ldm_cli.checkpoints.file import read_header
    from ldm_cli.models.loading import load_model

    own = detect_config(read_header(path))
    config = base_config(cfg, own)
    model, _ = load_model(path, device="cpu", dtype=torch.float32, cfg=own.with_(text=config.text))
    parts = (model.vae, model.text_encoder, model.unet)
    for part in parts:
        part.eval().requires_grad_(False)
    return FineTuneBase(path, config, *parts)


def check_base_fits(cfg: ModelConfig, path: Path, name: str) -> None:
    """`ldm train model --config NAME --base PATH`, before anything is loaded or trained: the
    base must be of the config's family and its U-Net tensors must fit the config's U-Net (as
    `start_from` will need), read from the checkpoint's header alone."""
    from ldm_cli.checkpoints.detect import FAMILY_NAMES, detect_config, is_upscaler_unet
    from ldm_cli.checkpoints.file import read_header

    header = read_header(path)
    own = detect_config(header)
    plain = not own.conditioner and not is_upscaler_unet(own.unet)
    if plain and own.unet.in_channels == own.vae.embed_dim and own.family != cfg.family:
        raise UserError(
            f"--config {name} is a {_family(cfg.family, FAMILY_NAMES)} model but --base "
            f"{path.name} is {_family(own.family, FAMILY_NAMES)}; pass a config of the base's "
            "family, or none to fine-tune the base's own architecture"
        )
    config = base_config(cfg, own)  # the base's kind, its text width and latent channels
    prefix = "model.diffusion_model."
    source = {k[len(prefix) :]: header.shape(k) for k in header.tensors if k.startswith(prefix)}
    try:
        unet_fit(_meta_unet_shapes(config), source)
    except UserError as e:
        raise UserError(f"--config {name} does not fit --base {path.name}: {e}") from None


def _family(family: str, names: dict) -> str:
    return f"{names.get(family, family)} ({family})"


def _meta_unet_shapes(cfg: ModelConfig) -> dict:
    from ldm_cli.models.loading import build_empty

    return {key: tuple(value.shape) for key, value in build_empty(cfg).unet.state_dict().items()}


def unet_fit(target: dict, source: dict) -> list[str]:
    """Whether a base U-Net whose tensors have the shapes ``source`` (name -> shape) fits a
    U-Net of shapes ``target``: every base tensor has its place, and what the base lacks are
    whole modules. Returns those modules; a UserError names the first misfit."""
    for key, shape in source.items():
        if key not in target:
            raise UserError(f"the base U-Net has {key}, which this config's U-Net lacks")
        if tuple(shape) != tuple(target[key]):
            raise UserError(
                f"{key}: the base U-Net's is {tuple(shape)}, this config's {tuple(target[key])}"
            )
    return sorted({_new_module(key, source) for key in target if key not in source})


def start_from(unet, base_unet) -> list[str]:
    """Load ``base_unet``'s weights into ``unet`` (strictly, every tensor accounted for) and
    return the modules of ``unet`` the base does not have, which keep their initialisation."""
    import torch

    target = unet.state_dict()
    source = base_unet.state_dict()
    added = unet_fit(
        {key: value.shape for key, value in target.items()},
        {key: value.shape for key, value in source.items()},
    )
    merged = {key: source.get(key, value) for key, value in target.items()}
    with torch.no_grad():
        unet.load_state_dict(merged, strict=True)
    return added


def _new_module(key: str, source: dict) -> str:
    """The outermost module holding ``key`` that has no tensor in ``source``; a tensor missing
    from a module the base does have (a changed block, not an added one) is an error."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if not any(name.startswith(prefix) for name in source):
            return prefix[:-1]
    raise UserError(f"the base U-Net lacks {key}: its blocks differ from this config's")
