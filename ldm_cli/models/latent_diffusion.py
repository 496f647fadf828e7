"""The root module: its state_dict keys are those of an original single-file checkpoint."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .text_encoder import CLIPTextEncoder
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg.unet)


class LatentDiffusion(nn.Module):
    """`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DiffusionWrapper(cfg)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = CLIPTextEncoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextEncoder:
        return self.cond_stage_model
