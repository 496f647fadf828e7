"""FLUX.1's and SD3/3.5's text encoders, laid out like ComfyUI's and Stability's all-in-one files.

State-dict keys are those found under ``text_encoders.`` in such a file:
``clip_l.transformer.text_model.*`` (plus ``clip_l.transformer.text_projection.weight`` when the
CLIP-L config has a projection: SD3), ``clip_g.transformer.text_model.*`` and
``clip_g.transformer.text_projection.weight`` (SD3), ``t5xxl.transformer.*`` (transformers'
``T5EncoderModel`` keys, :mod:`ldm_cli.models.t5_encoder`).

The encodings are those of diffusers' pipelines:

* :meth:`FlowTextEncoders.encode_flux` is ``FluxPipeline.encode_prompt``: CLIP-L's pooled
  output (final-normed, at the first end token) and T5's last hidden state.
* :meth:`FlowTextEncoders.encode_sd3` is ``StableDiffusion3Pipeline.encode_prompt`` with
  ``clip_skip=None``: each CLIP's penultimate hidden state (``hidden_states[-2]``, not
  final-normed; ``TextConfig.clip_skip`` = 2), concatenated on features and zero-padded to T5's
  width, then T5's states appended on the sequence; pooled = both CLIPs' projected pooled
  outputs (``text_embeds``) concatenated. Without a T5 (files that ship none) its part is
  zeros, as diffusers' pipeline gives when ``text_encoder_3`` is None.

Padding of the CLIP ids comes from each ``TextConfig.pad_token_id``. diffusers' SD3 tokenizers
pad CLIP-L with the end token (``<|endoftext|>``, 49407) and CLIP-G with ``"!"`` (id 0), as do
Stability's reference code (``SDXLClipGTokenizer(pad_with_end=False)``) and ComfyUI; FLUX's
CLIP-L padding does not matter (only the pooled output is read, causally before any padding).
The pooled output is taken at the first end token, which is also transformers' legacy
``argmax(input_ids)`` choice of the hub configs (``eos_token_id: 2``): 49407 is the largest id.
"""

from __future__ import annotations

from types import EllipsisType

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.core.flow_config import FlowModelConfig, T5Config
from ldm_cli.models.clip_text_model import CLIPTextModel, CLIPTextOutput
from ldm_cli.models.t5_encoder import T5EncoderModel
from ldm_cli.ops.conv_linear import Linear
from ldm_cli.text import t5_tokenizer
from ldm_cli.text.tokenizer import get_tokenizer


class CLIPTextWithProjection(nn.Module):
    """transformers' ``CLIPTextModelWithProjection`` layout: ``text_model`` and, when the config
    has a ``projection_dim``, a bias-free ``text_projection`` of the pooled output."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        else:
            self.text_projection = None


class CLIPTower(nn.Module):
    """One CLIP entry of the file (``clip_l`` or ``clip_g``): its tokenizer and text model."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.kind != "clip":
            raise ValueError(f"the flow models' CLIPs use the transformers layout, not {cfg.kind}")
        if not 1 <= cfg.clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must be in 1..{cfg.num_hidden_layers}")
        self.cfg = cfg
        self.transformer = CLIPTextWithProjection(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.final_layer_norm.weight.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77]``: start token, up to 75 BPE ids, end token, ``cfg.pad_token_id``."""
        return get_tokenizer(self.cfg.pad_token_id)(prompts).to(self.device)

    def run(self, prompts: list[str], hidden_states: bool = False) -> CLIPTextOutput:
        return self.transformer.text_model(self.tokenize(prompts), hidden_states)

    def penultimate_and_projected(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's reading: hidden_states[-clip_skip] (not normed), projected pooled output."""
        projection = self.transformer.text_projection
        if projection is None:
            raise ValueError("SD3's CLIPs need a text_projection (TextConfig.projection_dim)")
        output = self.run(prompts, hidden_states=True)
        context = output.hidden_states[-self.cfg.clip_skip].to(self.dtype)
        return context, projection(output.pooler_output)


class T5Tower(nn.Module):
    """The file's ``t5xxl`` entry: ``transformer`` is the T5 encoder."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.transformer = T5EncoderModel(cfg)

    def encode(self, prompts: list[str], length: int) -> torch.Tensor:
        weight = self.transformer.shared.weight
        ids = t5_tokenizer.t5_tokens(prompts, length).to(weight.device)
        return self.transformer(ids).to(weight.dtype)


class FlowTextEncoders(nn.Module):
    """CLIP-L, SD3's CLIP-G, and T5-XXL of a flow model. `t5` defaults to ``cfg.t5``; None
    builds no T5 (SD3 files without one; its features are then zeros)."""

    def __init__(self, cfg: FlowModelConfig, t5: T5Config | None | EllipsisType = ...):
        super().__init__()
        self.cfg = cfg
        self.t5_config = cfg.t5 if t5 is ... else t5
        self.clip_l = CLIPTower(cfg.clip_l)
        self.clip_g = CLIPTower(cfg.clip_g) if cfg.clip_g is not None else None
        self.t5xxl = T5Tower(self.t5_config) if self.t5_config is not None else None

    @property
    def context_width(self) -> int:
        """T5's width, which the SD3 CLIP features are padded to (4096 in released models)."""
        return (self.t5_config or self.cfg.t5).d_model

    def encode_flux(self, prompts: list[str], t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (T5 context ``[B, t5_tokens, d_model]``, CLIP-L pooled ``[B, 768]``)."""
        if self.t5xxl is None:
            raise ValueError("FLUX needs its T5 encoder; none was built")
        prompts = _as_list(prompts)
        pooled = self.clip_l.run(prompts).pooler_output.to(self.clip_l.dtype)
        return self.t5xxl.encode(prompts, t5_tokens), pooled

    def encode_sd3(self, prompts: list[str], t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context ``[B, 77 + t5_tokens, d_model]``, pooled ``[B, 768 + 1280]``)."""
        if self.clip_g is None:
            raise ValueError("SD3 encoding needs CLIP-G (FlowModelConfig.clip_g)")
        prompts = _as_list(prompts)
        context_l, pooled_l = self.clip_l.penultimate_and_projected(prompts)
        context_g, pooled_g = self.clip_g.penultimate_and_projected(prompts)
        clip_context = torch.cat([context_l, context_g.to(context_l.dtype)], dim=-1)
        width = self.context_width
        if clip_context.shape[-1] > width:
            raise ValueError(f"CLIP features ({clip_context.shape[-1]}) exceed T5's width {width}")
        clip_context = F.pad(clip_context, (0, width - clip_context.shape[-1]))
        if self.t5xxl is not None:
            t5_context = self.t5xxl.encode(prompts, t5_tokens)
        else:
            t5_context = clip_context.new_zeros(len(prompts), t5_tokens, width)
        context = torch.cat([clip_context, t5_context], dim=-2)
        return context, torch.cat([pooled_l, pooled_g], dim=-1)


def _as_list(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)
