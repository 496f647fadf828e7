"""The root module: its state_dict keys are those of an original single-file checkpoint."""

from __future__ import annotations

from torch import nn

from ldm_cli.core.config import ModelConfig
from ldm_cli.models.openclip_text import OpenCLIPTextEncoder
from ldm_cli.models.sdxl_conditioner import Conditioner
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.models.unet import UNetModel
from ldm_cli.models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg.unet)


class LatentDiffusion(nn.Module):
    """`model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.*` or (SDXL)
    `conditioner.embedders.*`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DiffusionWrapper(cfg)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.conditioner:  # SDXL: conditioner.embedders.N (see models.sdxl_conditioner)
            self.conditioner = Conditioner(cfg.text_encoders)
        elif cfg.text.kind == "openclip":
            self.cond_stage_model = OpenCLIPTextEncoder(cfg.text)
        else:
            self.cond_stage_model = CLIPTextEncoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextEncoder | OpenCLIPTextEncoder | Conditioner:
        if self.config.conditioner:
            return self.conditioner
        return self.cond_stage_model
