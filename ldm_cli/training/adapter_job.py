"""The settings of one `ldm train lora` / `ldm train ti` run, its working folder and the
checks made before anything loads.

A run writing ``NAME.safetensors`` keeps its resumable state, log and preview images in
``NAME.train/`` beside it. The output file is written once, atomically, at the end, and never
over an existing file; its bytes depend only on the trained tensors and the settings, so a run
killed and resumed ends with the same file as one that never stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ldm_cli.core.errors import UserError
from ldm_cli.training.adapter_data import CaptionOptions
from ldm_cli.training.adapter_stage import LossOptions
from ldm_cli.training.settings import LoopOptions, StageSettings

OUTPUT_SUFFIXES = (".safetensors", ".pt")
SAVE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class AdapterJob:
    data_dir: Path
    out: Path
    model: Path | None  # None: the embedded model
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    size: int | None = None  # training side in pixels (None: the model's native size)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    resume: bool = False
    save_every: int = 100
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = 0
    threads: int | None = None
    mixed_precision: str = "no"
    save_dtype: str = "fp32"
    checkpointing: bool = False  # gradient checkpointing of the U-Net's blocks
    quiet: bool = False
    stop_after: int | None = None  # tests: stop early as a crash would, state saved

    @property
    def run_dir(self) -> Path:
        return self.out.with_name(self.out.stem + ".train")

    def settings(self) -> StageSettings:
        warmup = min(100, max(1, self.steps // 10))
        return StageSettings(self.steps, self.batch_size, self.lr, warmup=warmup, weight_decay=0.0)

    def loop(self) -> LoopOptions:
        return LoopOptions(
            run_dir=self.run_dir,
            seed=self.seed,
            resume=self.resume,
            mixed_precision=self.mixed_precision,
            log_every=max(1, min(25, self.steps // 20 or 1)),
            save_every=max(0, self.save_every),
            sample_every=max(0, self.sample_every),
            samples=bool(self.sample_prompts),
            quiet=self.quiet,
            stop_after=self.stop_after,
            threads=self.threads,
        )

    def fingerprint(self, extra: dict) -> dict:
        """What a --resume must repeat exactly (StageSettings and the seed come on top)."""
        return {
            "data_dir": str(self.data_dir.resolve()),
            "size": self.size,
            "model": str(self.model.resolve()) if self.model else "embedded",
            "captions": asdict(self.captions),
            "loss": asdict(self.loss),
            **extra,
        }

    def check(self) -> None:
        """Everything that needs no model: before any weights load."""
        from ldm_cli.core.limits import check_seed

        check_seed(self.seed)
        if self.out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UserError(f"-o must end in .safetensors or .pt, not {self.out.name}")
        if self.out.exists():
            raise UserError(f"{self.out} exists; choose another -o (nothing is overwritten)")
        if not self.out.parent.is_dir():
            raise UserError(f"folder {self.out.parent} does not exist")
        if not self.data_dir.is_dir():
            raise UserError(f"image folder {self.data_dir} does not exist")
        if self.model is not None and not self.model.is_file():
            raise UserError(f"checkpoint not found: {self.model}")
        if self.size is not None and not (8 <= self.size <= 4096):
            raise UserError(f"--size must be 8 to 4096 pixels, not {self.size}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, not {value}")
        if not self.lr > 0:
            raise UserError(f"--lr must be a positive number, not {self.lr}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}")
        gamma = self.loss.min_snr_gamma
        if gamma is not None and not gamma > 0:
            raise UserError(f"--min-snr-gamma must be positive, not {gamma}")
        if not 0 <= self.loss.noise_offset <= 1:
            raise UserError(f"--noise-offset must be in [0, 1], not {self.loss.noise_offset}")
        self.captions.check()
        state = self.run_dir / "state"
        if not self.resume and self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            hint = "pass --resume to continue it" if _has_state(self.run_dir) else "delete it"
            raise UserError(f"{self.run_dir} holds an earlier run of this output; {hint}")
        if self.resume and not _has_state(self.run_dir):
            raise UserError(f"--resume: no saved state in {state.parent}; start without --resume")

    def side(self, pipe) -> int:
        """The training side: --size, else the model's own; a multiple of what it renders."""
        side = self.size or pipe.config.default_size
        if side % pipe.size_multiple:
            raise UserError(f"--size {side} is not a multiple of {pipe.size_multiple} pixels")
        return side

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.save_dtype
        ]


def _has_state(run_dir: Path) -> bool:
    """A stage folder of the run holds a saved state (or a complete one cut short)."""
    from ldm_cli.training.loop import STATE_DIR, existing_state

    stages = (path for path in run_dir.iterdir() if path.is_dir()) if run_dir.is_dir() else ()
    return any(existing_state(stage / STATE_DIR) is not None for stage in stages)


def base_model_version(config) -> str:
    """kohya's ``ss_base_model_version`` of a model configuration."""
    if config.conditioner:
        return "sdxl_base_v1-0"
    return "sd_v2" if config.text.kind == "openclip" else "sd_v1"
