"""`ldm info CKPT`."""

from __future__ import annotations

from pathlib import Path

import typer


def info(
    checkpoint: Path = typer.Argument(..., help="A single-file .safetensors checkpoint."),
    prediction: str | None = typer.Option(
        None,
        "--prediction",
        help="Report this prediction type (eps or v) instead of detecting it; without it an "
        "SD 2.x file with no v_pred tensor is loaded and probed (one U-Net call).",
    ),
) -> None:
    """Print a checkpoint's family, prediction type, dtypes and parameter counts."""
    from collections import Counter

    from ldm_cli.checkpoints.detect import FAMILY_NAMES, detect_config
    from ldm_cli.checkpoints.file import read_header
    from ldm_cli.checkpoints.flow_sources import is_flow_file
    from ldm_cli.checkpoints.header import KNOWN_EXTRAS
    from ldm_cli.core.config import ModelConfig

    header = read_header(checkpoint) if not checkpoint.is_dir() else None
    if header is None or any(k.endswith(CONTROL_MARKS) for k in header.tensors):
        return _control_info(checkpoint)
    if is_flow_file(header):
        if prediction is not None:
            from ldm_cli.core.errors import UserError

            raise UserError(f"--prediction does not apply to {checkpoint.name} (a flow model)")
        return _flow_info(header)
    if not any(
        k.startswith(("model.", "first_stage_model.", "conditioner.")) for k in header.tensors
    ):
        from ldm_cli.core.errors import UserError

        try:
            return _upscaler_info(checkpoint)
        except UserError:
            pass  # neither: detect_config names what the file lacks
    cfg = detect_config(header)
    cfg, how = _prediction(cfg, header, prediction)
    components = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.",
    }
    if cfg.conditioner:  # SDXL: conditioner.embedders.N, one line per text encoder
        del components["text_encoder"]
        for index in range(len(cfg.text_encoders)):
            name = "text_encoder" + (f"_{index + 1}" if index else "")
            components[name] = f"conditioner.embedders.{index}."
    print(f"file:        {header.path}")
    print(f"family:      {cfg.family} ({FAMILY_NAMES.get(cfg.family, cfg.family)})")
    print(f"prediction:  {cfg.prediction}{how}")
    print(f"resolution:  {cfg.default_size}x{cfg.default_size}")
    if cfg.default_cfg != ModelConfig.default_cfg:  # named in the file's ldm_config
        print(f"guidance:    {cfg.default_cfg:g} by default")
    # which text layer the U-Net reads; 1 = the last (SDXL: every tower, before its final norm)
    towers = " (every text encoder)" if len(cfg.text_encoders) > 1 else ""
    print(f"clip skip:   {cfg.text.clip_skip}{towers}")
    print(f"tensors:     {len(header.tensors)}")
    for name, prefix in components.items():
        infos = [
            t
            for k, t in header.tensors.items()
            if k.startswith(prefix) and not KNOWN_EXTRAS.match(k)
        ]
        count = sum(_numel(t.shape) for t in infos)
        dtypes = Counter(t.dtype for t in infos)
        kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
        print(f"{name + ':':<13}{count:>14,} parameters  ({kinds})")
    other = [k for k in header.tensors if not any(k.startswith(p) for p in components.values())]
    if other:
        print(f"other:       {len(other)} tensors (e.g. {other[0]})")


def _prediction(cfg, header, override: str | None):
    """(`cfg` with its prediction type settled, a note on how when not read from the file);
    a UserError where the file's tensors do not make the detected model."""
    from ldm_cli.checkpoints.prediction import check_prediction, settled_prediction, with_prediction
    from ldm_cli.models.loading import checked_architecture, load_model

    check_prediction(override)
    if override is not None or settled_prediction(cfg, header) is not None:
        # the tensors must make the model, with the same one-line error as `ldm generate`
        checked_architecture(header, cfg)
        if override is None:
            return cfg, ""
        return with_prediction(cfg, header, override), " (--prediction)"
    # the probe loads the model, which checks its tensors
    from ldm_cli.models.prediction_probe import probe_prediction

    model, _ = load_model(header, cfg=cfg)
    found = probe_prediction(model.unet)
    return with_prediction(cfg, header, found), " (probed: U-Net output at t=999)"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


CONTROL_MARKS = (
    "input_hint_block.0.weight",
    "controlnet_cond_embedding.conv_in.weight",
    "adapter.conv_in.weight",
)


def _control_info(path: Path) -> None:
    """A ControlNet or T2I-Adapter file (or diffusers folder): its layout, family and size."""
    from collections import Counter

    from ldm_cli.control.files import family_name, read_control_file

    file = read_control_file(path)
    count = sum(t.numel() for t in file.state.values())
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in file.state.values())
    print(f"file:        {path}")
    if file.is_adapter:
        print("family:      T2I-Adapter (full)")
    else:
        cfg = file.config
        print(f"family:      ControlNet for {family_name(cfg)} ({file.layout} layout)")
        widths = f"{cfg.model_channels} channels x {cfg.channel_mult}"
        print(f"encoder:     {widths}, context {cfg.context_dim}")
    print(f"tensors:     {len(file.state)}")
    kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
    print(f"parameters:  {count:,} ({kinds})")
    print(f"use:         ldm generate PROMPT --control {path} --control-image IMAGE")


def _upscaler_info(path: Path) -> None:
    """An image upscaler file (ldm-sr, ESRGAN, ...): its architecture, scale and size."""
    from ldm_cli.pipeline.tasks.image_upscaler import file_metadata, load_upscaler

    upscaler = load_upscaler(path, "cpu")
    params = list(upscaler.module.parameters())
    print(f"file:        {path}")
    print(f"family:      image upscaler ({upscaler.architecture}, x{upscaler.scale})")
    print(f"parameters:  {sum(p.numel() for p in params):,}")
    print(f"tensors:     {len(upscaler.module.state_dict())}")
    heldout = file_metadata(path).get("heldout_photos")
    if heldout:
        print(
            f"trained:     held-out photos {heldout['mean_gain_db']:+.2f} dB PSNR over bicubic "
            f"on average, {heldout['worst_gain_db']:+.2f} dB on the worst"
        )
    print(f"use:         ldm upscale IMAGE --upscaler {path}")


def _flow_info(header) -> None:
    """A FLUX or SD3 file: the release it is shaped like, each part's size, what it lacks.
    The parts it holds are built on the meta device and checked against its tensors."""
    import time
    from collections import Counter

    from ldm_cli.checkpoints.detect.flow import detect_flow, flow_model_name, missing_parts
    from ldm_cli.checkpoints.flow_sources import PART_PREFIXES, TRANSFORMER, flow_sources
    from ldm_cli.models.flow_loading import build_empty_flow, check_parts

    start = time.perf_counter()
    sources = flow_sources(header, {})
    cfg = detect_flow(sources.header)
    check_parts(build_empty_flow(cfg), sources)
    built = time.perf_counter() - start
    print(f"file:        {header.path}")
    print(f"family:      {cfg.family} ({flow_model_name(cfg)})")
    print("prediction:  flow (velocity; rectified flow)")
    print(f"resolution:  {cfg.default_size}x{cfg.default_size}")
    print(f"defaults:    {cfg.default_steps} steps, cfg {cfg.default_cfg:g}", end="")
    print(f", guidance {cfg.default_guidance:g}" if cfg.default_guidance else "")
    print(f"tensors:     {len(header.tensors)}")
    parts = {"transformer": TRANSFORMER, **PART_PREFIXES}
    for name, prefix in parts.items():
        infos = [t for k, t in sources.header.tensors.items() if k.startswith(prefix)]
        if not infos:
            continue
        count = sum(_numel(t.shape) for t in infos)
        dtypes = Counter(t.dtype for t in infos)
        kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
        print(f"{name + ':':<13}{count:>14,} parameters  ({kinds})")
    missing = missing_parts(sources.header, cfg)
    if missing:
        print(f"needs:       {' '.join(m + ' FILE' for m in missing)} to generate")
    print(f"checked:     every tensor's name and shape, on the meta device in {built:.1f} s")
