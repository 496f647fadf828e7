"""`ldm train controlnet`: a ControlNet for an existing model, trained on captioned images and
control maps made from them (canny by default), the model itself frozen.

The ControlNet starts as a copy of the model's U-Net encoder with its output convolutions (and
the hint embedding's last one) at zero, so at step 0 the model draws exactly as before; its hint
embedding halves the control image as many times as the model's VAE halves images. The loss is
the model's own (eps or v, min-SNR weighted, offset noise) with the residuals added; a third of
the captions are dropped so the ControlNet learns to read the layout from the map alone, as in
the ControlNet paper (which drops half). Latents, text features and maps are computed once; an
EMA of the weights is exported in the original layout (``control_model.*``), which
`--control FILE` loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.control.preprocessors import preprocess
from ldm_cli.models.controlnet import HINT_WIDTHS, ControlNet
from ldm_cli.samplers.schedules import DiscreteSchedule
from ldm_cli.training.dataset import default_holdout, holdout_split, load_captioned_images
from ldm_cli.training.loop import StepRandom, is_main_process, note, train_stage
from ldm_cli.training.run_log import merge_json
from ldm_cli.training.run_settings import data_fingerprint, path_key
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.unet_stage import noised_batch, prepare_examples

STAGE = "controlnet"
CAPTION_DROPOUT = 0.33
EMA_DECAY = 0.999
MODEL_FILE = "model.safetensors"
SAMPLES = 4


@dataclass(frozen=True)
class ControlNetPlan:
    data_dir: Path
    base: Path  # the model's checkpoint
    preprocess: str
    settings: StageSettings
    loop: LoopOptions
    holdout: int | None = None
    export_dtype: str = "fp16"
    init: Path | None = None  # a ControlNet file of the same shape to start from


def control_maps(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [N, 3, H, W] images -> their control maps, uint8 [N, 1, H, W] (the preprocessors
    give grey maps as RGB; the first channel is kept)."""
    from PIL import Image

    out = torch.empty((len(images), 1, *images.shape[-2:]), dtype=torch.uint8)
    for i, image in enumerate(images):
        rgb = Image.fromarray(image.permute(1, 2, 0).numpy())
        out[i, 0] = torch.from_numpy(np.asarray(preprocess(rgb, name))[..., 0].copy())
    return out


def hint_widths(latent_factor: int) -> tuple[int, ...]:
    """The hint embedding for a VAE that shrinks images `latent_factor` times."""
    halvings = int(math.log2(latent_factor))
    return HINT_WIDTHS[: halvings + 1]


def new_controlnet(unet, latent_factor: int) -> ControlNet:
    """The U-Net's encoder copied into a ControlNet whose outputs start at zero."""
    net = ControlNet(unet.config, hint_widths=hint_widths(latent_factor))
    encoder = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in _ENCODER}
    missing, unexpected = net.load_state_dict(encoder, strict=False)
    assert not unexpected and all(k.split(".")[0] in _NEW for k in missing), missing
    return net.zero_init()


_ENCODER = ("time_embed", "label_emb", "input_blocks", "middle_block")
_NEW = ("input_hint_block", "zero_convs", "middle_block_out")


def controlled_loss(net, unet, examples, hints, alphas, indices, generator, prediction):
    """The model's own loss with the ControlNet's residuals added (the model frozen)."""
    device = next(net.parameters()).device
    batch = noised_batch(examples, alphas, indices, generator, CAPTION_DROPOUT)
    hint = (hints[indices].float() / 255).expand(-1, 3, -1, -1).to(device)
    noisy, t, context = batch.noisy.to(device), batch.t.to(device), batch.context.to(device)
    output = unet(noisy, t, context, control=net(noisy, hint, t, context))
    return batch.loss(output, prediction)


def train_controlnet(plan: ControlNetPlan) -> dict:
    from ldm_cli.models.loading import load_model

    options = plan.loop
    if options.threads:
        torch.set_num_threads(options.threads)
    model, _ = load_model(plan.base, "cpu", torch.float32)
    cfg = model.config
    factor = cfg.vae.downscale
    data = load_captioned_images(plan.data_dir, cfg.default_size)
    holdout = plan.holdout or default_holdout(len(data))
    train_idx, held_idx = holdout_split(len(data), holdout, options.seed)
    train, heldout = data.subset(train_idx), data.subset(held_idx)
    note(options, f"controlnet: {plan.preprocess} maps and latents of {len(train)} images")
    hints = control_maps(train.images, plan.preprocess)
    examples = prepare_examples(model.vae, model.text_encoder, train, cfg.vae.scale_factor)
    unet = model.unet.requires_grad_(False).eval()
    torch.manual_seed(options.seed + 5)
    net = new_controlnet(unet, factor)
    if plan.init is not None:
        from ldm_cli.control.files import load_strict, read_control_file

        start = read_control_file(plan.init)
        weights = {k: v.float() for k, v in start.state.items()}
        load_strict(net, weights, start, "this model's ControlNet").requires_grad_(True)
        note(options, f"controlnet: starting from {plan.init}")
    alphas = DiscreteSchedule(cfg.schedule).alphas_cumprod
    settings = plan.settings

    def loss_fn(module, draws: StepRandom) -> torch.Tensor:
        indices = draws.batch_indices(len(examples.latents), settings.batch_size)
        return controlled_loss(
            module, unet, examples, hints, alphas, indices, draws.local, cfg.prediction
        )

    samples_dir = options.run_dir / "samples"
    held_maps = control_maps(heldout.images[:SAMPLES], plan.preprocess)

    def sample_fn(ema_net: ControlNet, step: int) -> None:
        path = samples_dir / f"controlnet_{step:06d}.safetensors"
        export(ema_net, path, plan, "fp32")
        write_samples(plan.base, path, heldout, held_maps, samples_dir / f"samples_{step:06d}.png")
        path.unlink()

    fingerprint = data_fingerprint(
        plan.data_dir,
        len(data),
        heldout=len(heldout),
        size=cfg.default_size,
        model=path_key(plan.base),
        preprocess=plan.preprocess,
        init=path_key(plan.init),
    )
    result = train_stage(
        STAGE, net, loss_fn, settings, options, EMA_DECAY, sample_fn, fingerprint=fingerprint
    )
    if not result.finished:
        return {}
    metrics = {"steps": result.step, "final_loss": result.final_loss()}
    if is_main_process():
        out = options.run_dir / MODEL_FILE
        export(result.ema.eval(), out, plan, plan.export_dtype)
        metrics["file_mb"] = round(out.stat().st_size / 1e6, 2)
        metrics["parameters"] = sum(p.numel() for p in result.ema.parameters())
        merge_json(options.run_dir / "metrics.json", {STAGE: metrics})
    return metrics


def export(net: ControlNet, path: Path, plan: ControlNetPlan, dtype: str) -> None:
    from ldm_cli.checkpoints.save import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = torch.float16 if dtype == "fp16" else torch.float32
    state = {f"control_model.{k}": v.detach().to(wanted) for k, v in net.state_dict().items()}
    about = {"base": Path(plan.base).name, "preprocess": plan.preprocess}
    save_checkpoint(state, path, metadata={"ldm_controlnet": json.dumps(about)})


def write_samples(base: Path, net_path: Path, heldout, maps: torch.Tensor, out: Path) -> None:
    """Rows: the control map, the model with the ControlNet, the held-out image."""
    from PIL import Image

    from ldm_cli.control.units import ControlSpec
    from ldm_cli.pipeline.load import load

    pipe = load(base, device="cpu", dtype="fp32")
    tiles = []
    for k in range(len(maps)):
        control = Image.fromarray(maps[k, 0].numpy()).convert("RGB")
        spec = ControlSpec(net_path, control)
        (image,) = pipe.generate(heldout.captions[k], steps=20, cfg=5.0, seed=k, control=spec)
        original = Image.fromarray(heldout.images[k].permute(1, 2, 0).numpy())
        tiles.append([control, image, original])
    side = tiles[0][0].width
    sheet = Image.new("RGB", (side * len(tiles), side * 3))
    for col, column in enumerate(tiles):
        for row, tile in enumerate(column):
            sheet.paste(tile, (col * side, row * side))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
