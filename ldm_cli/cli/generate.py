"""`ldm generate`: a thin layer over `Pipeline.render`."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from ldm_cli.cli.control import (
    CONTROL,
    CONTROL_END,
    CONTROL_IMAGE,
    CONTROL_MODE,
    CONTROL_START,
    CONTROL_WEIGHT,
    PREPROCESS,
    check_control_files,
    control_options,
)
from ldm_cli.cli.model_parts import (
    CLIP_G_FILE,
    CLIP_L_FILE,
    GUIDANCE,
    T5_FILE,
    VAE_FILE,
    part_files,
)
from ldm_cli.cli.networks import EMBEDDINGS, LORA, LORA_DIR
from ldm_cli.cli.performance import (
    COMPILE,
    CUDA_GRAPHS,
    DEEP_CACHE,
    LOW_MEMORY,
    OFFLOAD,
    PREVIEW,
    PREVIEW_EVERY,
    TOKEN_MERGING,
    Performance,
)
from ldm_cli.cli.vae import VAE_TILING
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_count, check_seed, check_side, check_steps, seed_option

DTYPE_HELP = (
    "auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16. On CPUs with AVX512-BF16 or AMX, "
    "bf16 is about 2x faster than fp32 but changes the image slightly (docs/benchmarks.md); "
    "fp16 on a CPU is very slow."
)

# Kept here (not imported from ldm_cli.samplers) so `ldm --help` never imports torch;
# tests/cli/test_cli.py checks that it matches the sampler table.
SAMPLER_HELP = {
    "euler": "Euler (first-order ODE)",
    "euler_a": "Euler ancestral (stochastic) - A1111 'Euler a'",
    "heun": "Heun (second-order ODE, 2 calls per step)",
    "dpm2": "DPM2 (second-order, 2 calls per step)",
    "lms": "linear multistep, order 4",
    "ddim": "DDIM (eta 0), timesteps as diffusers/A1111",
    "ddpm": "DDPM ancestral posterior sampling",
    "dpmpp_2m": "DPM++ 2M (second-order multistep)",
    "dpmpp_2m_sde": "DPM++ 2M SDE (stochastic)",
    "dpmpp_sde": "DPM++ SDE (stochastic, 2 calls per step)",
    "unipc": "UniPC (bh2 predictor-corrector)",
    "lcm": "LCM (Latent Consistency Models, LCM-LoRAs; 2-8 steps, --cfg 1-2)",
    "tcd": "TCD (TCD and Hyper-SD LoRAs; 4-8 steps, gamma --eta 0.3)",
}
SCHEDULER_NAMES = (
    "auto", "normal", "karras", "exponential", "simple", "sgm_uniform", "leading", "trailing",
    "lcm",
)  # fmt: skip
SCHEDULER_HELP = (
    "auto (the sampler's usual one), normal (evenly spaced timesteps), karras, exponential, "
    "simple, sgm_uniform, leading (DDIM's timesteps k*(1000//steps)+1), trailing (from "
    "t=999: what SDXL-Lightning, Hyper-SD and Turbo models expect), lcm (LCM's 50 distilled "
    "timesteps; lcm's and tcd's own)"
)
PREDICTION_HELP = (
    "What the U-Net predicts: eps or v (default: what the checkpoint tells; an SD 2.x file "
    "without a v_pred tensor is probed, as AUTOMATIC1111 does)."
)
CLIP_SKIP_HELP = (
    "Condition on the text encoder's N-th layer from the end, through its final layer norm: "
    "1 = last layer (SD 1.x default), 2 = penultimate (SD 2.x default). SDXL reads both "
    "encoders at that layer without the final layer norm (2 by default)."
)


SEED = typer.Option(
    None,
    "--seed",
    help="Seed of the first image; image k uses seed+k. Random if omitted or -1.",
    callback=seed_option,
)


def generate(
    ctx: typer.Context,
    prompt: str | None = typer.Argument(
        None, help="The prompt (or use --prompts-file / --from-png)."
    ),
    negative_prompt: str = typer.Option(
        "", "--negative-prompt", "-n", help="What to steer away from."
    ),
    steps: int | None = typer.Option(
        None, "--steps", "-s", help="Sampling steps (default: 30; a flow model's own count)."
    ),
    cfg: float | None = typer.Option(
        None,
        "--cfg",
        help="Classifier-free guidance scale (default: the checkpoint's own, else 7.5); 1 "
        "skips the unconditional pass.",
    ),
    seed: int | None = SEED,
    sampler: str | None = typer.Option(
        None,
        "--sampler",
        help="Default: euler_a (flow models: euler; they take euler, euler_a, heun, dpm2, "
        "lms). One of: " + "; ".join(f"{k}: {v}" for k, v in SAMPLER_HELP.items()),
    ),
    scheduler: str = typer.Option("auto", "--scheduler", help="Sigma spacing: " + SCHEDULER_HELP),
    width: int | None = typer.Option(
        None, "--width", "-W", help="Width in pixels (default: the model's native size)."
    ),
    height: int | None = typer.Option(
        None, "--height", "-H", help="Height in pixels (default: the model's native size)."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", "-b", help="Images rendered together in one batch."
    ),
    num_images: int = typer.Option(1, "--num-images", "-N", help="Images per prompt."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Checkpoint (.safetensors); default: the embedded model."
    ),
    out: Path = typer.Option(
        Path("outputs"), "--out", "-o", help="Output folder (created if missing)."
    ),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="One prompt per line; lines may carry A1111-style options."
    ),
    from_png: Path | None = typer.Option(
        None, "--from-png", help="Re-render an image from its embedded parameters."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    hires_scale: float | None = typer.Option(
        None,
        "--hires-scale",
        help="Hires fix: upscale each image by this factor (with --hires-upscaler, to the "
        "model's size multiple) and refine it with img2img.",
    ),
    hires_upscaler: str | None = typer.Option(
        None,
        "--hires-upscaler",
        help="Hires fix: ldm-sr (the embedded super-resolution network, default), Lanczos, "
        "or an upscaler file (ESRGAN, RealESRGAN, 4x-UltraSharp, ...; see `ldm upscale`).",
    ),
    hires_strength: float = typer.Option(
        0.5, "--hires-strength", help="Hires fix: img2img denoising strength (0..1)."
    ),
    hires_steps: int | None = typer.Option(
        None,
        "--hires-steps",
        help="Hires fix: schedule length of the second pass (default: --steps); it runs "
        "int(steps * strength) of them.",
    ),
    prediction: str | None = typer.Option(None, "--prediction", help=PREDICTION_HELP),
    clip_skip: int | None = typer.Option(None, "--clip-skip", help=CLIP_SKIP_HELP),
    refiner: Path | None = typer.Option(
        None,
        "--refiner",
        help="SDXL: an SDXL refiner checkpoint that takes over from the base for the last, "
        "low-noise part of every run (see --refiner-switch).",
    ),
    refiner_switch: float = typer.Option(
        0.8,
        "--refiner-switch",
        help="SDXL refiner: the fraction of the timestep range the base denoises (diffusers' "
        "denoising_end): 0.8 hands the steps below timestep 200 to the refiner.",
    ),
    rescale_cfg: float = typer.Option(
        0.0,
        "--rescale-cfg",
        help="Guidance rescale PHI in [0, 1] (diffusers' guidance_rescale; 0.7 in the paper): "
        "pulls the guided prediction's std back towards the conditional one's, against the "
        "over-exposure of strong CFG on v-prediction / zero-terminal-SNR models.",
    ),
    eta: float | None = typer.Option(
        None,
        "--eta",
        help="The share of fresh noise of the samplers that add it, in [0, 1]: euler_a, "
        "dpmpp_sde, dpmpp_2m_sde (default 1; 0 makes them deterministic) and tcd (its gamma, "
        "default 0.3; Hyper-SD's one-step LoRAs use 1).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run of the same command: render only the images not in "
        "the output folder yet (matched by their embedded parameters), under the numbers an "
        "uninterrupted run gives them. Needs --seed.",
    ),
    lora: list[str] = LORA,
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
    use_compile: bool = COMPILE,
    cuda_graphs: bool = CUDA_GRAPHS,
    offload: str = OFFLOAD,
    low_memory: bool | None = LOW_MEMORY,
    preview: Path | None = PREVIEW,
    preview_every: int = PREVIEW_EVERY,
    vae_tiling: str = VAE_TILING,
    deep_cache: int = DEEP_CACHE,
    token_merging: float = TOKEN_MERGING,
    control: list[Path] = CONTROL,
    control_image: list[Path] = CONTROL_IMAGE,
    preprocess: list[str] = PREPROCESS,
    control_weight: list[float] = CONTROL_WEIGHT,
    control_start: list[float] = CONTROL_START,
    control_end: list[float] = CONTROL_END,
    control_mode: str = CONTROL_MODE,
    guidance: float | None = GUIDANCE,
    vae: Path | None = VAE_FILE,
    clip_l: Path | None = CLIP_L_FILE,
    clip_g: Path | None = CLIP_G_FILE,
    t5: Path | None = T5_FILE,
) -> None:
    """Generate images from a prompt and write PNGs with their parameters embedded."""
    check_options(sampler, scheduler, steps, batch_size, num_images, device, dtype, seed)
    controls = control_options(
        control, control_image, preprocess, control_weight, control_start, control_end,
        control_mode,
    )  # fmt: skip
    check_model_options(prediction, clip_skip)
    check_side(width, "--width")
    check_side(height, "--height")
    given = _given(ctx, {"refiner_switch", "hires_strength", "hires_steps", "hires_upscaler"})
    check_pairings(given, refiner, refiner_switch, hires_scale, from_png)
    performance = Performance.checked(
        model, compile=use_compile, offload=offload, preview=preview, preview_every=preview_every,
        vae_tiling=vae_tiling, deep_cache=deep_cache, token_merging=token_merging,
        low_memory=low_memory, cuda_graphs=cuda_graphs,
        parts=part_files(vae, clip_l, clip_g, t5),
    )  # fmt: skip
    from ldm_cli.cli.batch_resume import check_output_dir

    check_output_dir(out)
    jobs = _jobs(prompt, prompts_file, from_png)
    if from_png is not None:  # what the command line gives wins over the PNG's settings
        from ldm_cli.cli.from_png import OVERRIDABLE, command_line_wins

        jobs = [command_line_wins(jobs[0], _given(ctx, OVERRIDABLE))]
    if resume and seed is None and any("seed" not in job["options"] for job in jobs):
        raise UserError(
            "--resume needs the --seed of the run it continues (the SEED in its file names "
            "NNNNN-SEED-...); without one every run draws new seeds"
        )
    if jobs[0].get("controlnets") and not controls:
        raise UserError(
            f"{from_png} was made with {', '.join(jobs[0]['controlnets'])}; its control images "
            "are not in the PNG: give --control FILE --control-image IMAGE again"
        )
    if clip_skip is None:
        clip_skip = jobs[0].get("clip_skip")
    if prediction is None:
        prediction = jobs[0].get("prediction")
    made_with = jobs[0].get("refiner")  # --from-png of an image made with a refiner
    if made_with and refiner is None:
        print(
            f"warning: {from_png} was made with the refiner {made_with}; without --refiner the "
            "image will differ",
            file=sys.stderr,
        )
    if made_with and refiner is not None and "refiner_switch" not in given:
        refiner_switch = jobs[0]["refiner_switch"]
    if vae_tiling == "auto":  # --from-png: as the image was made
        performance = replace(performance, vae_tiling=jobs[0].get("vae_tiling", "auto"))
    hires = jobs[0].get("hires")
    if hires_scale is not None:
        hires = hires_fix(hires_scale, hires_strength, hires_steps, hires_upscaler)
    elif hires is not None and hires_upscaler is not None:  # --from-png's, another upscaler
        hires = replace(hires, upscaler=hires_upscaler)

    pipe = load_pipeline(
        performance, model, device, dtype, prediction=prediction, clip_skip=clip_skip,
        refiner=refiner, refiner_switch=refiner_switch, lora=lora, lora_dir=lora_dir,
        embeddings=embeddings,
    )  # fmt: skip
    if hires is not None:
        hires.network(pipe.device)  # a bad --hires-upscaler file fails before any sampling
    wanted = jobs[0].get("model_hash")
    if wanted and wanted != pipe.model_hash:
        print(
            f"warning: {from_png} was made with model hash {wanted}, not {pipe.model_hash} "
            f"({pipe.name}); the image will differ",
            file=sys.stderr,
        )
    if from_png is not None:
        from ldm_cli.cli.from_png import vae_warning

        if warning := vae_warning(from_png, jobs[0], pipe):
            print(warning, file=sys.stderr)
    from ldm_cli.runtime.distributed import shared_random_seed

    defaults = request_options(
        performance, controls, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
        seed=shared_random_seed() if seed is None else seed,  # one seed for all processes
        sampler=sampler, scheduler=scheduler, width=width, height=height,
        rescale_cfg=rescale_cfg, num_images=num_images, batch_size=batch_size,
        guidance=guidance, eta=eta,
    )  # fmt: skip
    batches = _batches(pipe, jobs, defaults)
    if controls:
        check_control_files(pipe, batches[0][0])  # family, layout, aspect ratio: before rendering
    _run(pipe, batches, out, hires, resume)


def check_pairings(given: set[str], refiner, refiner_switch, hires_scale, from_png) -> None:
    """Options that only mean something beside another one."""
    if "refiner_switch" in given and refiner is None:
        raise UserError("--refiner-switch needs --refiner (the SDXL refiner checkpoint)")
    from ldm_cli.pipeline.tasks.handover import check_switch  # no torch there

    check_switch(refiner_switch)
    if given & {"hires_strength", "hires_steps"} and hires_scale is None:
        raise UserError("--hires-strength and --hires-steps need --hires-scale (the hires fix)")
    if "hires_upscaler" in given and hires_scale is None and from_png is None:
        raise UserError("--hires-upscaler needs --hires-scale (the hires fix)")


def hires_fix(hires_scale: float, hires_strength: float, hires_steps, hires_upscaler):
    """The hires fix the --hires-* options ask for (checked; no torch yet)."""
    from ldm_cli.pipeline.tasks.hires import UPSCALER, HiresFix

    return HiresFix(hires_scale, hires_strength, hires_steps, hires_upscaler or UPSCALER)


def load_pipeline(
    performance: Performance, model, device: str, dtype: str, *, prediction, clip_skip,
    refiner, refiner_switch: float, lora: list[str], lora_dir: Path, embeddings,
):  # fmt: skip
    """The model (and SDXL refiner) opened as the options say, LoRAs and embeddings set."""
    loaded = {"prediction": prediction, "clip_skip": clip_skip}
    pipe = performance.load(model, device, dtype, **loaded)
    if refiner is not None:  # SDXL base + refiner (ldm_cli.pipeline.tasks.refiner)
        from ldm_cli.pipeline.tasks.refiner import attach_refiner

        second = performance.load(refiner, pipe.device, pipe.dtype, **loaded)
        attach_refiner(pipe, second, refiner_switch)
    from ldm_cli.cli.networks import configure

    configure(pipe, lora, lora_dir, embeddings)  # LoRA and textual inversion (networks.lora)
    return pipe


def request_options(performance: Performance, controls: dict, **options) -> dict:
    """What `job_batches` takes: the request options (negative_prompt, steps, cfg, seed,
    sampler, scheduler, width, height, rescale_cfg, guidance, eta, num_images, batch_size)
    with the speed-ups that change the image and the ControlNets."""
    return {**options, **performance.speedups(), **controls}


def job_batches(pipe, prompt: str, options: dict) -> list:
    """One prompt's requests, made by the API from `request_options` (its defaults where
    None), in seeded batches: image k uses seed + k."""
    from ldm_cli.pipeline.request import seeded_batches

    o = dict(options)
    counts = (o.pop("num_images"), o.pop("batch_size"))
    negative = o.pop("negative_prompt")
    req = pipe.request(prompt, negative, **o)
    return seeded_batches(req, *counts)


def _batches(pipe, jobs: list[dict], defaults: dict) -> list:
    """Each job's requests (its own options over the command line's)."""
    return [
        b for job in jobs for b in job_batches(pipe, job["prompt"], {**defaults, **job["options"]})
    ]


def check_options(
    sampler, scheduler, steps, batch_size, num_images, device, dtype, seed=None
) -> None:
    if sampler is not None and sampler not in SAMPLER_HELP:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_HELP)}")
    if scheduler not in SCHEDULER_NAMES:
        names = ", ".join(SCHEDULER_NAMES)
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {names}")
    if steps is not None:
        check_steps(steps)
    check_count(num_images, "--num-images")
    check_count(batch_size, "--batch-size")
    if seed is not None:
        check_seed(seed, num_images)
    check_device_options(device, dtype)


def check_device_options(device: str, dtype: str) -> None:
    if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or mps")
    if dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise UserError(f"unknown --dtype {dtype!r}; use auto, fp32, fp16 or bf16")


def _given(ctx: typer.Context, names) -> set[str]:
    """The parameters among `names` that the command line (or the environment) set."""
    try:  # typer >= 0.26 carries its own copy of click
        from typer._click.core import ParameterSource
    except ImportError:  # pragma: no cover - older typer, on click itself
        from click.core import ParameterSource

    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name for name in names if ctx.get_parameter_source(name) in explicit}


def check_model_options(prediction: str | None, clip_skip: int | None) -> None:
    """What can be checked before loading; the upper bound of --clip-skip depends on the model."""
    if prediction is not None and prediction not in ("eps", "v"):
        raise UserError(f"unknown --prediction {prediction!r}; use eps or v")
    if clip_skip is not None and clip_skip < 1:
        raise UserError(f"--clip-skip must be at least 1 (the last layer), got {clip_skip}")


def _jobs(prompt: str | None, prompts_file: Path | None, from_png: Path | None) -> list[dict]:
    given = sum(x is not None for x in (prompt, prompts_file, from_png))
    if given != 1:
        raise UserError("give exactly one of PROMPT, --prompts-file FILE or --from-png IMAGE")
    if prompt is not None:
        return [{"prompt": prompt, "options": {}}]
    if prompts_file is not None:
        from ldm_cli.text.prompts_file import read_prompts_file

        return [
            {"prompt": j.prompt, "options": dict(j.overrides)}
            for j in read_prompts_file(prompts_file)
        ]
    from ldm_cli.cli.from_png import png_job

    return [png_job(from_png)]


def _run(pipe, batches, out: Path, hires=None, resume: bool = False) -> None:
    def render(batch, on_step, last):
        return pipe.render_text_to_image(batch, on_step, hires, last)

    def parameters(req) -> str:  # what --resume matches finished images by
        return pipe.text_to_image_parameters(req, hires)

    # image k of the run is NNNNN = base + k: --resume and `accelerate launch` rely on it
    from ldm_cli.cli.batch_resume import run_batches

    run_batches(batches, render, parameters, out, resume=resume)


def save_all(results, total_images: int, out: Path, step_label: str = "steps") -> None:
    """Save what `results(on_step)` yields, (request, image with its "parameters" info), as
    PNGs in `out`, printing each path, with progress bars on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ldm_cli.cli.batch_resume import check_output_dir, only_main_process
    from ldm_cli.cli.outputs import print_written, save_png_atomic
    from ldm_cli.core.interrupts import interrupt_after

    check_output_dir(out)  # before anything is rendered
    if not only_main_process():  # under `accelerate launch`: not shared, the main one does it
        return

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar:
        images_task = bar.add_task("images", total=total_images)
        steps_task = bar.add_task(step_label, total=None)

        def on_step(i: int, total: int) -> None:
            bar.update(steps_task, completed=i, total=total)

        for req, image in results(on_step):
            with interrupt_after():
                path = save_png_atomic(image, out, req.seed, req.prompt, image.info["parameters"])
                print_written(path)
            bar.advance(images_task)
