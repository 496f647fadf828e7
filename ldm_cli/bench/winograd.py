"""F.conv2d (oneDNN) against Winograd F(2x2, 3x3) on the 3x3 convolutions of SD 1.5, on the CPU.

`python -m ldm_cli.bench.winograd [--threads 2] [--reps 5] [--tile 2] [--sweep]` times both on
the U-Net's ResBlock shapes at 512 x 512 px (64 x 64 latent, batch 2) and the VAE decoder's at
512 x 512 px output (batch 1), fp32, random weights of conv-like scale. Calls alternate (conv,
winograd, conv, ...) so that a change in machine load hits both, and medians are reported, in
wall-clock ms and in process CPU ms. `rel err` is the max abs difference from a float64
convolution over the output's max abs value. `--sweep` adds smaller channel counts and sizes,
the grid that sets `MIN_CHANNELS` and `MIN_PIXELS` in ldm_cli.ops.winograd_conv.

On a machine whose cores are busy with another job, every multithreaded op waits for the
scheduler to wake its worker threads (about 8 ms per op on a loaded 2-core VM), which the
Winograd path, with its few ops per band, pays many times and a single oneDNN call pays once;
wall times at --threads 2 then say more about the load than about the kernels. With
--threads 1 there is nothing to wake, and the CPU-time columns measure the work itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ldm_cli.ops.winograd_conv import winograd_conv3x3

UNET = [(2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 1280, 16), (2, 1280, 1280, 8)]
VAE = [(1, 512, 512, 64), (1, 512, 512, 128), (1, 256, 256, 256), (1, 128, 128, 512)]
SWEEP = [
    (2, 1280, 1280, 4),
    (2, 640, 320, 64),
    (1, 512, 256, 256),
    (1, 256, 128, 512),
    (1, 256, 256, 64),
    (1, 192, 192, 128),
    (1, 128, 128, 64),
    (1, 128, 128, 256),
    (2, 64, 64, 64),
    (2, 64, 64, 32),
    (2, 32, 32, 64),
]


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(shape: tuple[int, int, int, int], reps: int, tile: int = 2) -> dict:
    """Interleaved medians (ms) of conv2d and winograd on (batch, cin, cout, size), plus errors."""
    n, cin, cout, size = shape
    g = torch.Generator().manual_seed(cin * size)
    x = torch.randn(n, cin, size, size, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    bias = torch.randn(cout, generator=g) * 0.1
    runs = {  # the weight transform is timed too: it is remade at every call
        "conv": lambda: F.conv2d(x, weight, bias, padding=1),
        "wino": lambda: winograd_conv3x3(x, weight, bias, tile),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs to check
        for _ in range(reps):
            for name, fn in runs.items():
                times[name].append(_timed(fn))
        ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    scale = ref.abs().max().item()
    result = {"shape": shape}
    for name, samples in times.items():
        result[f"{name}_ms"] = statistics.median(s[0] for s in samples) * 1e3
        result[f"{name}_cpu_ms"] = statistics.median(s[1] for s in samples) * 1e3
        result[f"{name}_err"] = (outputs[name].double() - ref).abs().max().item() / scale
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm_cli.bench.winograd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tile", type=int, default=2, choices=(2, 4))
    parser.add_argument("--sweep", action="store_true", help="also the threshold-setting grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"F({args.tile}x{args.tile}, 3x3) vs F.conv2d, fp32 CPU, {args.threads} threads, "
        f"{args.reps} interleaved reps, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'model':5} {'batch x cin>cout @ size':>24} {'conv2d ms':>10} {'winograd ms':>12} "
        f"{'ratio':>6} {'cpu ratio':>9} {'rel err wino':>13} {'rel err conv':>13}"
    )
    print(header)
    rows = [("unet", s) for s in UNET] + [("vae", s) for s in VAE]
    rows += [("sweep", s) for s in SWEEP] if args.sweep else []
    for model, shape in rows:
        r = measure(shape, args.reps, args.tile)
        n, cin, cout, size = shape
        desc = f"{n} x {cin}>{cout} @ {size}x{size}"
        print(
            f"{model:5} {desc:>24} {r['conv_ms']:10.1f} {r['wino_ms']:12.1f} "
            f"{r['conv_ms'] / r['wino_ms']:6.2f} {r['conv_cpu_ms'] / r['wino_cpu_ms']:9.2f} "
            f"{r['wino_err']:13.2e} {r['conv_err']:13.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
