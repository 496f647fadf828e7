"""`make bench`: ldm against diffusers on the same random full-size SD 1.5 checkpoint.

Each measurement runs in its own fresh process (ldm_cli.bench.worker); the table shows both
tools, their ratio, and achieved GFLOP/s against this machine's measured fp32 matmul peak
(the faster of torch's matmul and the same product as a oneDNN convolution). On the CPU it also
puts both beside stable-diffusion.cpp and OpenVINO (peer_table.py; --no-peers to skip them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm_cli.bench.report import (
    compiled_lines,
    max_pixel_diff,
    repeats_note,
    size_table,
    winograd_lines,
)

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "sd15"


# the real v1-5-pruned-emaonly.safetensors holds fp32 weights, its "-fp16" sibling fp16
FILE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def checkpoint(cache: Path, file_dtype: str = "fp16") -> Path:
    from ldm_cli.core.config import SD15
    from ldm_cli.testing import random_checkpoint

    path = cache / f"sd15-random-{file_dtype}.safetensors"
    if not path.exists():
        print(f"building {path} (seeded random weights, real SD 1.5 layout)...", flush=True)
        dtype = FILE_DTYPES[file_dtype]
        random_checkpoint(SD15, path, seed=0, dtype=dtype, with_metadata=False)
    return path


def diffusers_config(cache: Path) -> Path:
    """The reference SD 1.5 config folder without the safety checker (nothing to download)."""
    import shutil

    out = cache / "sd15-config"
    if not out.exists():
        shutil.copytree(REFERENCE, out)
        index = json.loads((out / "model_index.json").read_text())
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
        index["requires_safety_checker"] = False
        (out / "model_index.json").write_text(json.dumps(index))
    return out


def warm_page_cache(path: Path) -> None:
    """Read the file once so that neither tool pays for the disk (whichever runs first)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def controlnet_file(cache: Path) -> Path:
    """A seeded random SD 1.5 ControlNet in lllyasviel's layout, fp16 (as the
    control_v11p_sd15_*.safetensors files)."""
    path = cache / "controlnet-sd15-random-fp16.safetensors"
    if not path.exists():
        from ldm_cli.checkpoints.save import save_checkpoint
        from ldm_cli.core.config import SD15
        from ldm_cli.models.controlnet import ControlNet

        print(f"building {path} (seeded random weights, control_model.* layout)...", flush=True)
        torch.manual_seed(0)
        state = ControlNet(SD15.unet).state_dict()
        save_checkpoint({f"control_model.{k}": v.half() for k, v in state.items()}, path)
    return path


def worker(
    tool: str,
    model: Path,
    size: int,
    steps: int,
    png: Path,
    device: str,
    dtype: str,
    controlnet: Path | None = None,
) -> dict:
    warm_page_cache(model)
    cmd = [
        sys.executable,
        "-m",
        "ldm_cli.bench.worker",
        tool,
        "--model",
        str(model),
        "--config",
        str(diffusers_config(model.parent)),
        "--size",
        str(size),
        "--steps",
        str(steps),
        "--png",
        str(png),
        "--device",
        device,
        "--dtype",
        dtype,
    ]
    if controlnet is not None:
        warm_page_cache(controlnet)
        cmd += ["--controlnet", str(controlnet)]
    env = dict(
        os.environ, LDM_BENCH_T0=repr(time.time()), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(
    device: str = "cpu", dtype: str = "fp32", reps: int = 10, as_conv: bool = False
) -> float:
    """Best of `reps` n x n matmuls; `as_conv`: the same product as a 1x1 convolution (on the
    CPU that is oneDNN rather than MKL's sgemm, twice as fast on AMD: models/conv_linear.py)."""
    import torch.nn.functional as F

    n = 2048 if device == "cpu" else 8192
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(torch_dtype)
    b = torch.randn(n, n, device=device).to(torch_dtype)
    if as_conv:
        image, kernel = a.view(1, n, 1, n).permute(0, 3, 1, 2), b.view(n, n, 1, 1)

        def product():
            return F.conv2d(image, kernel)
    else:

        def product():
            return a @ b

    product()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        product()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def model_gflop(size: int) -> tuple[float, float]:
    """(U-Net per CFG step, VAE decode) in GFLOP, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_cli.core.config import SD15
    from ldm_cli.models.loading import build_empty

    model = build_empty(SD15)
    lat = size // 8
    with FlopCounterMode(display=False) as unet_count:
        model.unet(
            torch.empty(2, 4, lat, lat, device="meta"),
            torch.empty(2, device="meta"),
            torch.empty(2, 77, 768, device="meta"),
        )
    with FlopCounterMode(display=False) as vae_count:
        model.vae.decode(torch.empty(1, 4, lat, lat, device="meta"))
    return unet_count.get_total_flops() / 1e9, vae_count.get_total_flops() / 1e9


def controlnet_gflop(size: int) -> float:
    """An SD 1.5 ControlNet's work per CFG step in GFLOP, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_cli.core.config import SD15
    from ldm_cli.models.controlnet import ControlNet

    with torch.device("meta"):
        net = ControlNet(SD15.unet)
    lat = size // 8
    with FlopCounterMode(display=False) as count:
        net(
            torch.empty(2, 4, lat, lat, device="meta"),
            torch.empty(2, 3, size, size, device="meta"),
            torch.empty(2, device="meta"),
            torch.empty(2, 77, 768, device="meta"),
        )
    return count.get_total_flops() / 1e9


def wall(cmd: list[str], reps: int, env: dict[str, str] | None = None) -> float:
    """The median wall time of `reps` runs of `cmd`, after one run not counted (it writes the
    byte-code caches a user's installation has)."""
    times = []
    for k in range(reps + 1):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        if k:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def startup_lines() -> list[str]:
    """`ldm --help`, `import torch` alone, and the embedded default model process start to PNG:
    its default 30 steps and its LCM-LoRA's 4 (the issue's measure is the time beyond torch's
    import). Python may write its byte-code caches, as it does on a user's machine."""
    from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    script = Path(sys.executable).parent / "ldm"
    # where ldm is not installed (a GPU machine running it from the source tree), the module
    ldm = [str(script)] if script.exists() else [sys.executable, "-m", "ldm_cli.cli"]
    lines = [f"- `ldm --help`: {wall([*ldm, '--help'], 5, env):.2f} s (median of 5)"]
    torch_alone = wall([sys.executable, "-c", "import torch"], 5, env)
    lines.append(f'- `python -c "import torch"`: {torch_alone:.2f} s (median of 5)')
    lcm = WEIGHTS_DIR / "ldm-shapes-lcm.safetensors"
    runs = {
        "default": [],
        "LCM-LoRA, `--sampler lcm --steps 4 --cfg 1`": [
            "--lora",
            str(lcm),
            "--sampler",
            "lcm",
            "--steps",
            "4",
            "--cfg",
            "1",
        ],
    }
    if not (WEIGHTS_DIR / DEFAULT_NAME).exists():
        return lines
    prompt = "a red circle on a blue background"
    for label, extra in runs.items():
        if extra and not lcm.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [*ldm, "generate", prompt, "--seed", "1", "--out", tmp, *extra]
            seconds = wall(cmd, 5, env)
        lines.append(
            f'- embedded model, {label}: `ldm generate "{prompt}" --seed 1` process start to '
            f"PNG {seconds:.2f} s (median of 5), {seconds - torch_alone:.2f} s beyond torch's "
            "import"
        )
    return lines


def tiled_vae_lines(size: int) -> list[str]:
    """`--vae-tiling` at its default tiles: wall time and peak RSS of a fresh process."""
    from ldm_cli.bench.vae_2048 import measure

    r = measure(size, "on")
    return [
        f"- SD 1.5 VAE, {r['tiles']} tiles of 64x64 latent cells (overlap 16), fp32 CPU: "
        f"decode {r['decode_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
        f"(weights and latent alone: {r['rss_before_decode_gib']:.2f} GiB)"
    ]


def run_order(tools: list[str], repeat: int) -> list[str]:
    """Repeat r runs the tools rotated by r, so none is always first (or always after the
    same one) while the machine's speed drifts."""
    shift = repeat % len(tools)
    return tools[shift:] + tools[:shift]


def ablation_tool() -> str:
    """The worker that runs ldm with Winograd flipped from this CPU's default."""
    from ldm_cli.ops.winograd_conv import default_mode

    return "ldm-conv2d" if default_mode() == "auto" else "ldm-winograd"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when available (then fp16), else cpu (fp32)",
    )
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: per device")
    ap.add_argument(
        "--file-dtypes",
        default="fp16,fp32",
        help="the checkpoint files to run, by the dtype they store (comma-separated): fp32 as "
        "the real v1-5-pruned-emaonly.safetensors, fp16 as its -fp16 sibling",
    )
    ap.add_argument(
        "--tiled-vae-size",
        type=int,
        default=2048,
        help="also time a tiled SD 1.5 VAE decode at this size, with its peak RSS (0: skip)",
    )
    ap.add_argument(
        "--ablate-winograd",
        action="store_true",
        help="also run ldm with its Winograd convolutions flipped from this CPU's default (on for "
        "AVX2, off otherwise) and report what they buy",
    )
    ap.add_argument(
        "--compile-variants",
        action="store_true",
        help="also run ldm with --compile and, on CUDA, --cuda-graphs, and report what they buy "
        "against eager (use 10+ steps: graphs are recorded on the second call)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every tool this many times, interleaved; the table shows medians and the "
        "median (range) of the per-repeat ratios",
    )
    ap.add_argument(
        "--controlnet-size",
        type=int,
        default=256,
        help="also run both tools with an SD 1.5 ControlNet (random, fp16 file) at this size, "
        "fp16 checkpoint (0: skip)",
    )
    ap.add_argument(
        "--startup-only",
        action="store_true",
        help="only time `ldm --help` and the embedded model end to end (prints, writes nothing)",
    )
    ap.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        help="also run the CPU specialists stable-diffusion.cpp (f16, q8_0) and OpenVINO (fp32) "
        "beside ldm and diffusers, each from PyPI in its own environment under CACHE/peers "
        "(built once); default: on for the CPU",
    )
    return ap


def _size_tables(args, device: str, dtype: str, file_dtypes: list[str], peak: float) -> list:
    """Every tool on every file dtype and size (repeated, interleaved): the tables' lines."""
    lines: list[str] = []
    ablation = ablation_tool() if args.ablate_winograd else None
    compiled = []
    if args.compile_variants:
        compiled = ["ldm-compile"] + (["ldm-cuda-graphs"] if device == "cuda" else [])
    tools = ["ldm", "diffusers"] + ([ablation] if ablation else []) + compiled
    with tempfile.TemporaryDirectory() as tmp:
        for file_dtype, size in itertools.product(file_dtypes, map(int, args.sizes.split(","))):
            model = checkpoint(args.cache, file_dtype)
            run = (size, args.steps)
            start = len(lines)
            pngs = {tool: Path(tmp) / f"{tool}-{file_dtype}-{size}.png" for tool in tools}
            results: dict[str, list[dict]] = {tool: [] for tool in tools}
            for repeat in range(max(1, args.repeats)):
                for tool in run_order(tools, repeat):
                    results[tool].append(worker(tool, model, *run, pngs[tool], device, dtype))
            ours, ref = results["ldm"], results["diffusers"]
            diff = max_pixel_diff(pngs["ldm"], pngs["diffusers"])
            title = f"## {size}x{size}, {file_dtype} file"
            lines += size_table(title, ours, ref, model_gflop(size), peak, diff)
            if ablation:
                wino_diff = max_pixel_diff(pngs["ldm"], pngs[ablation])
                other = results[ablation]
                wino, plain = (other, ours) if ablation == "ldm-winograd" else (ours, other)
                lines += winograd_lines(wino, plain, wino_diff)
            if compiled:
                diffs = {tool: max_pixel_diff(pngs["ldm"], pngs[tool]) for tool in compiled}
                variants = {tool: results[tool] for tool in compiled}
                lines += compiled_lines(variants, ours, diffs)
            print("\n".join(lines[start:]), flush=True)
    return lines


def controlnet_table(args, device: str, dtype: str, peak: float) -> list[str]:
    """ldm and diffusers' StableDiffusionControlNetPipeline, one ControlNet, same files."""
    size, model, control = args.controlnet_size, checkpoint(args.cache), controlnet_file(args.cache)
    results: dict[str, list[dict]] = {"ldm": [], "diffusers": []}
    with tempfile.TemporaryDirectory() as tmp:
        pngs = {tool: Path(tmp) / f"{tool}-controlnet.png" for tool in results}
        for repeat in range(max(1, args.repeats)):
            for tool in run_order(list(results), repeat):
                run = worker(tool, model, size, args.steps, pngs[tool], device, dtype, control)
                results[tool].append(run)
        diff = max_pixel_diff(pngs["ldm"], pngs["diffusers"])
    unet, vae = model_gflop(size)
    work = (unet + controlnet_gflop(size), vae)
    title = f"## ControlNet (SD 1.5, one unit), {size}x{size}, fp16 files"
    lines = size_table(title, results["ldm"], results["diffusers"], work, peak, diff)
    print("\n".join(lines), flush=True)
    return lines


def peer_lines(args, dtype: str) -> list[str]:
    """ldm and diffusers against stable-diffusion.cpp and OpenVINO on the fp16 file (peer_table)."""
    from ldm_cli.bench.peer_table import peer_comparison

    model = checkpoint(args.cache, "fp16")

    def ours(tool: str, size: int, steps: int, png: Path) -> dict:
        return worker(tool, model, size, steps, png, "cpu", dtype)

    sizes = [int(size) for size in args.sizes.split(",")]
    config = diffusers_config(args.cache)
    return peer_comparison(
        args.cache,
        model,
        config,
        sizes,
        args.steps,
        args.repeats,
        ours,
        run_order,
        torch.get_num_threads(),
    )


def main() -> None:
    args = _parser().parse_args()
    if args.startup_only:
        print("\n".join(startup_lines()))
        return
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    if args.peers is None:
        args.peers = device == "cpu"
    if args.peers and device != "cpu":
        raise SystemExit("--peers compares CPU tools: use --device cpu (or --no-peers)")
    args.cache.mkdir(parents=True, exist_ok=True)
    file_dtypes = args.file_dtypes.split(",")
    if unknown := set(file_dtypes) - set(FILE_DTYPES):
        raise SystemExit(f"--file-dtypes: unknown {', '.join(sorted(unknown))} (fp16, fp32)")
    sgemm = matmul_peak_gflops(device, dtype)
    conv = matmul_peak_gflops(device, dtype, as_conv=True) if device == "cpu" else 0.0
    peak = max(sgemm, conv)
    conv_note = f", as a oneDNN 1x1 convolution {conv:.0f}" if conv else ""
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {machine_name(device)}, torch {torch.__version__}, "
        f"{dtype} matmul peak {sgemm:.0f} GFLOP/s{conv_note} (the peak column: the higher).",
        f"Settings: random SD 1.5 checkpoint ({' and '.join(file_dtypes)} files, {dtype} "
        f"compute on {device}), Euler, "
        f"{args.steps} steps, CFG 7.5 (batch 2), each tool in a fresh process, run one after "
        f"the other{repeats_note(args.repeats)}. Produced by `make bench`.",
        "",
    ]
    lines += _size_tables(args, device, dtype, file_dtypes, peak)
    if args.peers:
        lines += peer_lines(args, dtype)
    if args.controlnet_size:
        lines += controlnet_table(args, device, dtype, peak)
    extra = startup_lines()
    lines += ["## Start-up", "", *extra, ""]
    print("\n".join(extra))
    if args.tiled_vae_size:
        tiled = tiled_vae_lines(args.tiled_vae_size)
        lines += [
            f"## Tiled VAE decode at {args.tiled_vae_size}x{args.tiled_vae_size}",
            "",
            *tiled,
            "",
        ]
        print("\n".join(tiled))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
