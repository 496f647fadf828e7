"""The root module of a flow model: its state_dict keys are those of an all-in-one SD3 or
ComfyUI FLUX file (`model.diffusion_model.*`, `first_stage_model.*`, `text_encoders.*`)."""

from __future__ import annotations

from torch import nn

from ldm_cli.core.flow_config import FlowModelConfig
from ldm_cli.models.flow_text import FlowTextEncoders
from ldm_cli.models.flux import FluxTransformer
from ldm_cli.models.mmdit import MMDiT
from ldm_cli.models.vae import AutoencoderKL


class FlowWrapper(nn.Module):
    def __init__(self, cfg: FlowModelConfig):
        super().__init__()
        kind = FluxTransformer if cfg.is_flux else MMDiT
        self.diffusion_model = kind(cfg.transformer)


class FlowDiffusion(nn.Module):
    """The transformer, the 16-channel VAE and the text encoders of one flow model."""

    def __init__(self, cfg: FlowModelConfig):
        super().__init__()
        self.config = cfg
        self.model = FlowWrapper(cfg)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.text_encoders = FlowTextEncoders(cfg)

    @property
    def transformer(self) -> FluxTransformer | MMDiT:
        return self.model.diffusion_model

    @property
    def unet(self) -> FluxTransformer | MMDiT:
        """The denoiser, under the name every pipeline stage uses."""
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> FlowTextEncoders:
        return self.text_encoders
