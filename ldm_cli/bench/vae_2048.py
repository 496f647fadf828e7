"""Tiled VAE decode at 2048 x 2048 px with the full-size SD 1.5 VAE: wall time and peak RSS.

`python -m ldm_cli.bench.vae_2048 [--size 2048] [--tiling on|off] [--tile 64] [--overlap 16]`
decodes a seeded random 256 x 256 latent (size / 8) with a randomly initialised SD 1.5 VAE in
fp32 on the CPU, in a fresh process so that its peak RSS is the decode's alone (the weights
take 0.3 GiB). The target for the tiled 2048 px decode is a peak under 6 GB. `measure()` is
the same as a function returning the numbers, for `make bench`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGET_GB = 6.0


def measure(size: int = 2048, tiling: str = "on", tile: int = 64, overlap: int = 16) -> dict:
    """Run the decode in a fresh process; returns its timings (s) and peak RSS (GiB)."""
    cmd = [sys.executable, "-m", "ldm_cli.bench.vae_2048", "--worker", "--size", str(size)]
    cmd += ["--tiling", tiling, "--tile", str(tile), "--overlap", str(overlap)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"VAE decode benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's VmHWM belongs to the process's own address space; ru_maxrss would start at the
    parent's peak (a child inherits it through fork and exec), so a large parent hides a
    small child's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, else KiB


def _peak_rss_gib() -> float:
    return peak_rss_bytes() / 2**30


def _worker(size: int, tiling: str, tile: int, overlap: int) -> dict:
    start = time.perf_counter()
    import torch

    from ldm_cli.core.config import SD15
    from ldm_cli.core.tiling import tile_grid
    from ldm_cli.models.vae import AutoencoderKL
    from ldm_cli.pipeline.vae_codec import decode_tiled
    from ldm_cli.testing import randomize_

    with torch.device("meta"):  # every weight is overwritten by randomize_
        vae = AutoencoderKL(SD15.vae)
    vae = randomize_(vae.to_empty(device="cpu"), seed=0).eval()
    side = size // SD15.vae.downscale
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, SD15.vae.z_channels, side, side, generator=gen)
    ready, rss_ready = time.perf_counter(), _peak_rss_gib()
    with torch.inference_mode():
        if tiling == "on":
            image = decode_tiled(vae, latents / SD15.vae.scale_factor, tile, overlap)
        else:
            image = vae.decode(latents / SD15.vae.scale_factor)
    done = time.perf_counter()
    return {
        "size": size,
        "tiling": tiling,
        "tiles": len(tile_grid(side, side, tile, overlap)) if tiling == "on" else 1,
        "decode_s": done - ready,
        "process_s": done - start,
        "rss_before_decode_gib": rss_ready,
        "peak_rss_gib": _peak_rss_gib(),
        "finite": bool(torch.isfinite(image).all()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--tiling", choices=("on", "off"), default="on")
    ap.add_argument("--tile", type=int, default=64, help="tile side in latent cells")
    ap.add_argument("--overlap", type=int, default=16, help="overlap in latent cells")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.size, args.tiling, args.tile, args.overlap)))
        return
    r = measure(args.size, args.tiling, args.tile, args.overlap)
    verdict = "under" if r["peak_rss_gib"] * 2**30 < TARGET_GB * 1e9 else "OVER"
    how = "untiled"
    if args.tiling == "on":
        how = f"{r['tiles']} tile(s) of {args.tile} latent cells, overlap {args.overlap}"
    print(
        f"SD 1.5 VAE decode {r['size']}x{r['size']} px, {how}, fp32 CPU:\n"
        f"  decode wall time {r['decode_s']:.1f} s (process {r['process_s']:.1f} s)\n"
        f"  peak RSS {r['peak_rss_gib']:.2f} GiB (weights and latent: "
        f"{r['rss_before_decode_gib']:.2f} GiB), {verdict} the {TARGET_GB:g} GB target"
    )


if __name__ == "__main__":
    main()
