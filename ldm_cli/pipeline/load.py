"""Opening a checkpoint as a pipeline: one `LoadOptions` for everything that changes how.

`load_model_with` reads the header, detects the family from tensor shapes, applies
`--clip-skip`, builds the model and loads it strictly (`models.loading`), settles the prediction
type (`--prediction`, the file, or the SD 2.x probe), then compiles the U-Net or installs the
offload hooks (`runtime`). Option clashes are refused before any weights are read.
`load_pipeline` wraps the model in the pipeline of its family (`api.Pipeline`, or
`api.SDXLPipeline` for SDXL base, inpainting and refiner files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.flow_sources import flow_sources, is_flow_file
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.checkpoints.prediction import (
    check_prediction,
    settled_prediction,
    with_clip_skip,
    with_prediction,
)
from ldm_cli.core.devices import resolve_device, resolve_dtype
from ldm_cli.core.embedded import default_model_path
from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.loading import load_model
from ldm_cli.ops.cpu_kind import narrow_weights_by_default
from ldm_cli.pipeline.api import Pipeline, SDXLPipeline
from ldm_cli.pipeline.vae_codec import check_mode
from ldm_cli.runtime.offload import apply_offload, check_offload_device


@dataclass(frozen=True)
class LoadOptions:
    """`prediction` ("eps" or "v") overrides what the file tells or the probe finds (SD 2.x);
    `clip_skip` takes the text encoder's output that many layers from the end (1 = last).
    `compile` runs the U-Net through torch.compile; `offload` ("model", "sequential"; CUDA)
    keeps the weights in CPU memory (runtime.offload). `vae_tiling` ("auto", "on", "off")
    decodes and encodes large images in tiles (pipeline.vae_codec). `low_memory` keeps an
    fp16 file's large U-Net weights in fp16 on the CPU, widened per call (ops.narrow_weights):
    None (the default) does so where this CPU's steps do not pay for it or memory is short
    (ops.cpu_kind.narrow_weights_by_default), never with `compile` or `offload`; False
    converts them at load.
    `cuda_graphs` (CUDA) compiles the U-Net to replay each step as CUDA graphs
    (runtime.compile). `vae`, `clip_l`, `clip_g`, `t5`: files of a flow model's parts that
    its main file lacks or that replace its own (FLUX's ae.safetensors, clip_l.safetensors,
    t5xxl_fp16.safetensors; checkpoints.flow_sources)."""

    prediction: str | None = None
    clip_skip: int | None = None
    compile: bool = False
    offload: str = "none"
    vae_tiling: str = "auto"
    low_memory: bool | None = None
    cuda_graphs: bool = False
    vae: str | Path | None = None
    clip_l: str | Path | None = None
    clip_g: str | Path | None = None
    t5: str | Path | None = None

    @property
    def part_files(self) -> dict[str, Path]:
        """The flow-model part files given, by part name."""
        parts = {"vae": self.vae, "clip_l": self.clip_l, "clip_g": self.clip_g, "t5": self.t5}
        return {name: Path(p) for name, p in parts.items() if p is not None}

    def check(self, device: torch.device) -> None:
        """The clashes that need no file: before any weights are read."""
        check_prediction(self.prediction)
        check_mode(self.vae_tiling)
        check_offload_device(self.offload, device)
        if self.cuda_graphs and self.offload != "none":
            raise UserError(
                "--cuda-graphs does not work with --offload (a graph replays on the memory it "
                "was recorded with, and offloading moves the weights); use one of them"
            )
        if self.compiled and self.offload == "sequential":
            raise UserError(
                "--compile does not work with --offload sequential (weights are swapped layer "
                "by layer inside the U-Net); use --offload model"
            )
        if self.compiled and self.low_memory:
            flag = "--cuda-graphs" if self.cuda_graphs else "--compile"
            raise UserError(f"--low-memory does not work with {flag}; use one of them")
        if self.compiled:
            from ldm_cli.runtime.compile import check_compile

            check_compile(device, self.cuda_graphs)

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    def narrow(self, header: CheckpointHeader) -> bool:
        """Keep narrow weights narrow: compiled graphs and offload hooks expect the compute
        dtype, so only by default where there are neither, and where this CPU's steps do not
        pay for it or memory is short (ops.cpu_kind.narrow_weights_by_default)."""
        if self.low_memory is None:
            if self.compiled or self.offload != "none":
                return False
            return narrow_weights_by_default(header.path.stat().st_size)
        return self.low_memory


def load_model_with(
    path: str | Path, device: torch.device, dtype: torch.dtype, options: LoadOptions
) -> tuple[LatentDiffusion, CheckpointHeader]:
    """The model of the checkpoint at `path`, prepared as `options` say (module docstring)."""
    options.check(device)
    # offloaded weights are read into CPU memory and never all sit on the GPU at once
    home = device if options.offload == "none" else torch.device("cpu")
    header = read_header(path)
    if is_flow_file(header):
        return load_flow_with(header, device, home, dtype, options), header
    text_parts = [name for name in options.part_files if name != "vae"]  # --vae: attach_vae
    if text_parts:
        given = ", ".join("--" + name.replace("_", "-") for name in text_parts)
        raise UserError(
            f"{given}: separate text encoder files are for FLUX and SD3 models; "
            f"{header.path.name} is not one"
        )
    cfg = with_clip_skip(detect_config(header), options.clip_skip)
    model, header = load_model(
        header, device=home, dtype=dtype, cfg=cfg, narrow=options.narrow(header)
    )
    model.config = settle_prediction(cfg, header, model, options.prediction)
    if options.compiled:
        from ldm_cli.runtime.compile import compile_unet

        compile_unet(model.unet, device, options.cuda_graphs)
    apply_offload(model, options.offload, device)
    return model, header


def load_flow_with(header, device, home, dtype, options: LoadOptions):
    """A FLUX or SD3 model (models.flow_model.FlowDiffusion) from its main file and the part
    files the options name."""
    # imported here, as below: opening an SD file needs none of the flow models' modules
    from ldm_cli.checkpoints.detect.flow import detect_flow, flow_model_name, missing_parts
    from ldm_cli.models.flow_loading import load_flow_model

    if options.prediction is not None or options.clip_skip is not None:
        flag = "--prediction" if options.prediction is not None else "--clip-skip"
        raise UserError(f"{flag} does not apply to {header.path.name} (a flow model)")
    parts = {
        name: read_header(p)
        for name, p in options.part_files.items()
        if not (name == "vae" and is_tiny_vae(p))  # a TAESD decodes beside the model's VAE
    }
    sources = flow_sources(header, parts)
    cfg = detect_flow(sources.header)
    missing = missing_parts(sources.header, cfg)
    if missing:
        raise UserError(
            f"{header.path.name} is a {flow_model_name(cfg)} transformer without "
            f"{', '.join(m.lstrip('-').replace('-', ' ').upper() for m in missing)} weights: "
            f"give them with {' and '.join(m + ' FILE' for m in missing)}"
        )
    model = load_flow_model(sources, cfg, home, dtype, narrow=options.narrow(header))
    if options.compiled:
        from ldm_cli.runtime.compile import compile_unet

        compile_unet(model.unet, device, options.cuda_graphs)
    apply_offload(model, options.offload, device)
    return model


def is_tiny_vae(path: str | Path) -> bool:
    from ldm_cli.models.vae_file import read_vae_file

    return read_vae_file(path)[1].kind == "taesd"


def attach_vae(pipe: Pipeline, path: str | Path) -> None:
    """`--vae FILE` on a loaded pipeline: its weights over the model's VAE (an SD model; a
    flow model's was loaded as one of its parts), or a TAESD that decodes in its place."""
    from ldm_cli.models.taesd_loading import load_tiny_autoencoder
    from ldm_cli.models.vae_file import load_vae_weights, read_vae_file

    header, layout = read_vae_file(path)
    if layout.kind == "taesd":
        tiny = load_tiny_autoencoder(header.path, pipe.device, pipe.dtype)
        channels = pipe.config.vae.embed_dim
        if tiny.config.latent_channels != channels:
            raise UserError(
                f"--vae {header.path.name} is a TAESD for {tiny.config.latent_channels}-channel "
                f"latents; {pipe.name} has {channels} (taesd/taesdxl: SD 1.x/2.x/XL, "
                "taesd3/taef1: SD3/FLUX)"
            )
        if tiny.decoder is None:
            raise UserError(
                f"--vae {header.path.name} holds only a TAESD encoder; give the decoder file "
                "(taesd_decoder.safetensors)"
            )
        if tiny.config.downscale != pipe.latent_factor:
            raise UserError(
                f"--vae {header.path.name} is a TAESD for {tiny.config.downscale}x latents; "
                f"{pipe.name}'s VAE scales by {pipe.latent_factor}"
            )
        pipe.tiny_vae = tiny
    elif isinstance(pipe.model, LatentDiffusion):  # a flow model's VAE is one of its parts
        load_vae_weights(pipe.model.vae, header, layout, pipe.name)
    pipe.vae_file = header.path


def settle_prediction(cfg, header: CheckpointHeader, model: LatentDiffusion, override):
    """`cfg` with its prediction type settled: `override`, else the file's, else probed."""
    if override is not None:
        return with_prediction(cfg, header, override)
    if settled_prediction(cfg, header) is not None:
        return cfg
    from ldm_cli.models.prediction_probe import probe_prediction

    return with_prediction(cfg, header, probe_prediction(model.unet))


def load_pipeline(
    path: str | Path | None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    options: LoadOptions = LoadOptions(),
) -> Pipeline:
    """The checkpoint at `path` (default: the embedded model) as a pipeline of its family."""
    path = Path(path) if path else default_model_path()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, header = load_model_with(path, dev, dt, options)
    if not isinstance(model, LatentDiffusion):
        from ldm_cli.pipeline.flow_api import FlowPipeline

        pipe = FlowPipeline(model, header.path, dev, dt)
    else:
        kind = SDXLPipeline if model.config.conditioner else Pipeline
        pipe = kind(model, header.path, dev, dt)
        detected = detect_config(header)
        pipe.file_clip_skip = detected.text.clip_skip
        pipe.file_prediction = settled_prediction(detected, header)
    pipe.vae_tiling = options.vae_tiling
    if options.vae is not None:
        attach_vae(pipe, options.vae)
    return pipe


def load(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **options,
) -> Pipeline:
    """`load_pipeline` with the options as keywords (those of `LoadOptions`); `ldm_cli.load`."""
    try:
        chosen = LoadOptions(**options)
    except TypeError:
        names = sorted(set(options) - set(LoadOptions.__dataclass_fields__))
        raise TypeError(f"load() got an unexpected keyword argument {names[0]!r}") from None
    return load_pipeline(path, device, dtype, chosen)
