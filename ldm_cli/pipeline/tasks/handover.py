"""Where an SDXL base hands a run over to its refiner (`Refiner`), apart from attaching one
(`tasks.refiner`), so that the SDXL pipeline and its packed conditioning rows can name it
without importing what imports them. No torch here: the CLI checks `--refiner-switch` with it."""

from __future__ import annotations

from dataclasses import dataclass

from ldm_cli.core.errors import UserError
from ldm_cli.pipeline.parts import PipelineParts

DEFAULT_SWITCH = 0.8


def check_switch(switch: float) -> None:
    if not 0.0 <= switch <= 1.0:
        raise UserError(f"--refiner-switch must be within [0, 1], got {switch}")


@dataclass(frozen=True)
class Refiner:
    """A loaded refiner (an SDXL refiner pipeline) and where it takes over (a fraction of the
    timestep range)."""

    pipe: PipelineParts
    switch: float = DEFAULT_SWITCH

    def __post_init__(self) -> None:
        check_switch(self.switch)

    @property
    def cutoff(self) -> float:
        """Timesteps below this go to the refiner (diffusers' ``discrete_timestep_cutoff``)."""
        n = self.pipe.config.schedule.num_train_timesteps
        return float(int(round(n - self.switch * n)))
