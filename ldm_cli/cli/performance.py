"""The `--compile`, `--cuda-graphs`, `--offload`, `--low-memory`, `--preview`, `--vae-tiling`
and `--deep-cache` options shared by `ldm generate`, `img2img`, `inpaint` and `outpaint` (see
ldm_cli.runtime.compile, ldm_cli.runtime.offload, models/narrow_weights, ldm_cli.runtime.preview,
ldm_cli.pipeline.vae_codec, ldm_cli.runtime.deep_cache). torch is not imported here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from ldm_cli.cli.vae import check_vae_tiling
from ldm_cli.core.errors import UserError

COMPILE = typer.Option(
    False,
    "--compile",
    help="Run the U-Net through torch.compile (inductor, static shapes) after a one-time "
    "compilation at the first step (seconds to minutes); the same image up to float rounding. "
    "Meant for GPUs: on a 2-core EPYC CPU the compiled SD 1.5 U-Net measured 2x slower than "
    "ldm's own eager one (docs/benchmarks.md). Needs a C++ compiler on the CPU, triton on CUDA.",
)
CUDA_GRAPHS = typer.Option(
    False,
    "--cuda-graphs",
    help="CUDA: --compile in torch's reduce-overhead mode, which records each step's kernels "
    "as CUDA graphs and replays them with one launch (for small images on fast GPUs, where "
    "launching kernels costs more than running them). Implies --compile; not with --offload.",
)
OFFLOAD = typer.Option(
    "none",
    "--offload",
    help="Keep the weights in CPU memory (CUDA only; accelerate): none; model moves each "
    "component (text encoder, U-Net, VAE) to the GPU while it runs; sequential moves the U-Net "
    "and VAE layer by layer, for the smallest GPUs (SDXL in 4-6 GB), much slower.",
)
LOW_MEMORY = typer.Option(
    None,
    "--low-memory/--no-low-memory",
    help="CPU, fp16/bf16 checkpoint: keep the U-Net's large weights in the file's 16 bits and "
    "widen them to fp32 a slice at a time in each step, instead of converting them at load "
    "(SD 1.5: 1.5 GB less memory, loads 0.6 s faster; the same image up to float rounding). "
    "Default: on where it costs no speed (AVX-512 CPUs; on AVX2 ones its steps measured 24% "
    "slower) or where widening would leave too little memory free; off with --compile or "
    "--offload.",
    show_default=False,
)
PREVIEW = typer.Option(
    None,
    "--preview",
    help="Write a small PNG of the image being sampled to FILE every --preview-every steps "
    "(replaced atomically, for an image viewer that reloads it), decoded by a linear "
    "latent-to-RGB map fitted to the model's VAE instead of the VAE itself.",
)
DEEP_CACHE = typer.Option(
    0,
    "--deep-cache",
    help="Reuse the U-Net's deep features for N-1 of every N U-Net calls (DeepCache): a reused "
    "call costs 23% of a full one on SD 1.5 (N=3: 2.0x fewer U-Net FLOPs, N=5: 2.6x), at a "
    "measured cost in image fidelity (docs/benchmarks.md); it changes the image, so it is "
    "written into the PNG. "
    "0 or 1: off.",
)
TOKEN_MERGING = typer.Option(
    0.0,
    "--token-merging",
    help="Merge this ratio (0..0.9) of the tokens of the U-Net's full-resolution "
    "self-attention into similar ones (ToMe for SD; A1111's 'Token merging ratio'): at 0.5 "
    "those attentions compute a quarter of the scores; it changes the image (measured costs "
    "in docs/benchmarks.md), so it is written into the PNG. 0: off.",
)
PREVIEW_EVERY = typer.Option(
    5, "--preview-every", help="Steps between --preview images (the last step is also written)."
)


@dataclass(frozen=True, kw_only=True)
class Performance:
    """The options' values; `check` runs before torch is imported, `load` opens the model."""

    compile: bool = False
    offload: str = "none"
    preview: Path | None = None
    preview_every: int = 5
    vae_tiling: str = "auto"
    # Request fields (they change the image), checked here before anything loads
    deep_cache: int = 0
    token_merging: float = 0.0
    low_memory: bool | None = None
    cuda_graphs: bool = False
    # a flow model's part files (--vae, --clip-l, --clip-g, --t5): (load option, path) pairs
    parts: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def checked(cls, model: Path | None, **values) -> Performance:
        """The options of a command, checked; the model file starts hashing while torch
        imports (ldm_cli.checkpoints.hash)."""
        performance = cls(**values)
        performance.check()
        from ldm_cli.checkpoints.hash import hash_in_background

        hash_in_background(model)
        return performance

    def check(self) -> None:
        from ldm_cli.runtime.deep_cache import check_deep_cache
        from ldm_cli.runtime.offload import check_offload_mode
        from ldm_cli.runtime.token_merging import check_token_merging

        check_offload_mode(self.offload)
        check_vae_tiling(self.vae_tiling)
        check_deep_cache(self.deep_cache)
        check_token_merging(self.token_merging)
        if (self.compile or self.cuda_graphs) and self.deep_cache > 1:
            flag = "--cuda-graphs" if self.cuda_graphs else "--compile"
            raise UserError(f"--deep-cache does not work with {flag}; use one of them")
        if self.preview_every < 1:
            raise UserError(f"--preview-every must be at least 1, got {self.preview_every}")
        if self.preview is not None:
            from ldm_cli.runtime.preview_file import check_preview_path

            check_preview_path(self.preview)

    def speedups(self) -> dict:
        """The Request fields of the opt-in, image-changing speed-ups."""
        return {"deep_cache": self.deep_cache, "token_merging": self.token_merging}

    def load(self, model: Path | None, device, dtype, **options):
        """`ldm_cli.load` with these options; the pipeline writes previews when asked to."""
        from ldm_cli.pipeline.load import load

        pipe = load(
            model, device, dtype, compile=self.compile, offload=self.offload,
            vae_tiling=self.vae_tiling, low_memory=self.low_memory,
            cuda_graphs=self.cuda_graphs, **dict(self.parts), **options,
        )  # fmt: skip
        if self.preview is not None:
            from ldm_cli.runtime.preview import PreviewWriter

            pipe.preview = PreviewWriter(self.preview, self.preview_every)
        return pipe
