"""One measurement of a peer (stable-diffusion.cpp or OpenVINO) in a fresh process, or the one-off
conversion of the SD 1.5 file into that peer's format.

Run by the PEER's python (bench-cache/peers/*-venv/bin/python peer_worker.py MODE ...), which has
no ldm_cli: this script imports only the standard library at module level and the peer's own
packages inside its functions. It prints one JSON line: load, generation, sampling and decode
seconds (null where the peer does not tell them apart), end to end from LDM_BENCH_T0 (set by
the parent just before it spawns us), and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time

CFG = 7.5


def peak_rss_mb() -> float:
    """VmHWM: ru_maxrss would start at the parent's peak (inherited through fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_seconds(log: str) -> dict[str, float]:
    """sd.cpp's per-stage timings from its log lines, "<stage> completed, taking 1.23s"."""
    found = re.findall(r"(\w+) completed, taking ([0-9.]+)s", log)
    return {stage: float(seconds) for stage, seconds in found}


# sd.cpp calls these from C until the process ends: they must outlive every model
_LOG_CALLBACKS: list = []


def sdcpp_log_into(lines: list[str]) -> None:
    """Route sd.cpp's log into `lines` (the binding prints it to stderr, or nowhere when not
    verbose), for its per-stage timings and for the reason of a failure."""
    import ctypes

    import stable_diffusion_cpp as sd

    @sd.sd_log_callback
    def keep(level, text, data):
        lines.append(text.decode("utf-8", errors="replace"))

    _LOG_CALLBACKS.append(keep)
    sd.sd_set_log_callback(keep, ctypes.c_void_p(0))


def _error_lines(log: list[str]) -> str:
    errors = [line for line in log if "error" in line.lower()] or log[-3:]
    return "".join(errors[-5:]).strip()


def run_sdcpp(args) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    log: list[str] = []
    sdcpp_log_into(log)
    t = {"imported": time.time()}
    try:
        model = StableDiffusion(
            model_path=args.model,
            wtype=args.wtype,
            n_threads=args.threads,
            vae_decode_only=True,  # as sd.cpp's own CLI does for text to image
            verbose=False,
        )
        t["loaded"] = time.time()
        (image,) = model.generate_image(
            prompt=args.prompt,
            negative_prompt=args.negative,
            width=args.size,
            height=args.size,
            cfg_scale=CFG,
            sample_method="euler",
            scheduler="discrete",
            sample_steps=args.steps,
            seed=args.seed,
            progress_callback=lambda step, steps, seconds: None,  # no progress bar on stdout
        )
        t["generated"] = time.time()
    except Exception as error:
        raise SystemExit(f"sd.cpp failed: {error}: {_error_lines(log)}") from error
    image.save(args.png)
    t["written"] = time.time()
    model.close()
    stages = stage_seconds("".join(log))
    return {
        **t,
        "encode_s": stages.get("get_learned_condition"),
        "sample_s": stages.get("sampling"),
        "decode_s": stages.get("decode_first_stage"),
    }


def convert_sdcpp(args) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    log: list[str] = []
    sdcpp_log_into(log)
    converter = StableDiffusion(verbose=False)
    ok = converter.convert(args.model, output_path=args.out, output_type=args.wtype)
    converter.close()
    if not ok:
        raise SystemExit(f"sd.cpp conversion failed: {_error_lines(log)}")
    return {"out": args.out}


def convert_openvino(args) -> dict:
    """The SD 1.5 file -> a diffusers folder (fp32) -> OpenVINO IR, as optimum-intel exports it."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from optimum.intel import OVStableDiffusionPipeline

    with tempfile.TemporaryDirectory(dir=os.path.dirname(args.out)) as tmp:
        pipe = StableDiffusionPipeline.from_single_file(
            args.model, config=args.config, local_files_only=True, safety_checker=None
        )
        pipe.save_pretrained(tmp)
        del pipe
        # load_in_8bit=False: keep every weight in fp32 (no size-based default compression)
        ov = OVStableDiffusionPipeline.from_pretrained(
            tmp, export=True, compile=False, load_in_8bit=False, local_files_only=True
        )
        ov.save_pretrained(args.out)
    return {"out": args.out}


def run_openvino(args) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    t = {"imported": time.time()}
    # f32 even where the CPU has bf16 (AMX), where OpenVINO would otherwise choose bf16
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(args.threads)}
    pipe = OVStableDiffusionPipeline.from_pretrained(args.model, ov_config=config, compile=False)
    # static shapes, as optimum-intel's documentation recommends for CPU inference
    pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
    pipe.compile()
    # the same Euler schedule as the diffusers worker (ldm_cli.bench.worker)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    t["loaded"] = time.time()
    latents = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        output_type="latent",
    ).images
    sampled = time.time()
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    t["generated"] = time.time()
    image.save(args.png)
    t["written"] = time.time()
    # text encoding is inside the pipeline call: sampling here includes it
    return {
        **t,
        "encode_s": None,
        "sample_s": sampled - t["loaded"],
        "decode_s": t["generated"] - sampled,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["sdcpp", "sdcpp-convert", "openvino", "openvino-convert"])
    ap.add_argument("--model", required=True, help="the SD 1.5 file, a GGUF, or an OpenVINO folder")
    ap.add_argument("--out", help="conversions: the file or folder to write")
    ap.add_argument("--config", help="openvino-convert: the diffusers SD 1.5 config folder")
    ap.add_argument("--wtype", default="default", help="sd.cpp weight type (f16, q8_0, default)")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--negative", default="blurry")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--png", help="where to write the image")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return ap


def main() -> None:
    args = _parser().parse_args()
    t0 = float(os.environ.get("LDM_BENCH_T0", time.time()))
    if args.mode.endswith("-convert"):
        converter = convert_sdcpp if args.mode == "sdcpp-convert" else convert_openvino
        print(json.dumps(converter(args)), flush=True)
        return
    t = run_sdcpp(args) if args.mode == "sdcpp" else run_openvino(args)
    result = {
        "tool": args.mode,
        "size": args.size,
        "steps": args.steps,
        "threads": args.threads,
        "import_s": t["imported"] - t0,
        "load_s": t["loaded"] - t["imported"],
        "generate_s": t["generated"] - t["loaded"],
        "encode_s": t["encode_s"],
        "sample_s": t["sample_s"],
        "decode_s": t["decode_s"],
        "end_to_end_s": t["written"] - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
