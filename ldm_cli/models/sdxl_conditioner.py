"""SDXL's text conditioning, laid out like SGM's ``GeneralConditioner`` (its text embedders).

An original SDXL file stores its text encoders under ``conditioner.embedders.N``:

* base: ``embedders.0`` is CLIP ViT-L (``FrozenCLIPEmbedder``, keys
  ``transformer.text_model.*`` as in SD 1.x) and ``embedders.1`` OpenCLIP ViT-bigG/14
  (``FrozenOpenCLIPEmbedder2``, keys ``model.*`` as in SD 2.x, ``text_projection`` and
  ``logit_scale`` included);
* refiner: ``embedders.0`` is the bigG tower alone.

The other embedders of the SGM config (the micro-conditioning sizes) have no weights; their
part of the ADM vector is built in :mod:`ldm_cli.pipeline.tasks.sdxl`.

Each tower gives the hidden state ``clip_skip`` blocks from the end (2: the penultimate layer
SDXL uses) *without* its final layer norm, as SGM's ``layer="hidden"``/``"penultimate"`` and
diffusers' ``hidden_states[-2]`` do; the features of all towers are concatenated (768 + 1280 =
2048 for the base). The OpenCLIP tower also gives its pooled output: ``ln_final`` of the last
block at the end token, times ``text_projection`` (1280 wide), whatever ``clip_skip`` is.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.models.clip_text_model import EOS_TOKEN_ID
from ldm_cli.models.openclip_text import OpenCLIPTextEncoder, OpenCLIPTextModel
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.text.tokenizer import get_tokenizer


def repad(tokens: torch.Tensor, pad_id: int, eos_id: int = EOS_TOKEN_ID) -> torch.Tensor:
    """`tokens` [B, L] with every position after the first end token set to `pad_id`: token
    ids made for one tower (49407 padding for CLIP-L, 0 for OpenCLIP) fitted to another."""
    is_eos = tokens == eos_id
    length = tokens.shape[-1]
    first = torch.where(is_eos.any(dim=-1), is_eos.int().argmax(dim=-1), length)
    after = torch.arange(length, device=tokens.device)[None] > first[:, None]
    return torch.where(after, torch.full_like(tokens, pad_id), tokens)


def clip_hidden(encoder: CLIPTextEncoder, tokens: torch.Tensor, skip: int) -> torch.Tensor:
    """The output of the `skip`-th layer from the end, no final layer norm."""
    return encoder.text_model(tokens, output_hidden_states=True).hidden_states[-skip]


def openclip_hidden_and_pooled(
    model: OpenCLIPTextModel, tokens: torch.Tensor, skip: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state of the `skip`-th block from the end without ln_final, pooled projection)."""
    blocks = model.transformer.resblocks
    keep = len(blocks) - (skip - 1)
    x = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[-1]]
    hidden = None
    for index, block in enumerate(blocks):
        if index == keep:
            hidden = x
        x = block(x)
    if hidden is None:
        hidden = x
    last = model.ln_final(x)
    rows = torch.arange(last.shape[0], device=last.device)
    pooled = last[rows, tokens.argmax(dim=-1).to(last.device)] @ model.text_projection
    return hidden, pooled


class Conditioner(nn.Module):
    """``conditioner.embedders.N``: prompts or token ids -> (context, pooled).

    ``context`` is [B, 77, sum of the towers' widths]; ``pooled`` [B, projection_dim] comes from
    the (last) OpenCLIP tower. The interface beside it matches the other text encoders
    (``tokenize``, ``encode``, ``materialize_buffers``).
    """

    def __init__(self, texts: tuple[TextConfig, ...]):
        super().__init__()
        if not any(cfg.kind == "openclip" for cfg in texts):
            raise ValueError("an SDXL conditioner needs an OpenCLIP tower for its pooled output")
        for cfg in texts:
            if not 1 <= cfg.clip_skip <= cfg.num_hidden_layers:
                raise ValueError(
                    f"clip_skip must be in 1..{cfg.num_hidden_layers}, got {cfg.clip_skip}"
                )
        self.configs = tuple(texts)
        self.embedders = nn.ModuleList(
            OpenCLIPTextEncoder(cfg) if cfg.kind == "openclip" else CLIPTextEncoder(cfg)
            for cfg in texts
        )

    @property
    def cfg(self) -> TextConfig:
        """The first tower's configuration (what single-encoder callers read)."""
        return self.configs[0]

    @property
    def context_dim(self) -> int:
        return sum(cfg.hidden_size for cfg in self.configs)

    @property
    def pooled_dim(self) -> int:
        cfg = [c for c in self.configs if c.kind == "openclip"][-1]
        return cfg.projection_dim or cfg.hidden_size

    def materialize_buffers(self) -> None:
        for embedder in self.embedders:
            embedder.materialize_buffers()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, prompts: str | list[str]) -> list[torch.Tensor]:
        """Token ids for each tower, padded as that tower was trained (49407 or 0)."""
        return [get_tokenizer(cfg.pad_token_id)(prompts).to(self.device) for cfg in self.configs]

    def forward(
        self, tokens: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (one tensor per tower, or one tensor re-padded for each) -> (context,
        pooled)."""
        if isinstance(tokens, torch.Tensor):
            tokens = [repad(tokens, cfg.pad_token_id) for cfg in self.configs]
        if len(tokens) != len(self.embedders):
            raise ValueError(f"{len(tokens)} token tensors for {len(self.embedders)} text towers")
        features, pooled = [], None
        for cfg, embedder, ids in zip(self.configs, self.embedders, tokens, strict=True):
            ids = ids.to(self.device)
            if isinstance(embedder, OpenCLIPTextEncoder):
                hidden, pooled = openclip_hidden_and_pooled(embedder.model, ids, cfg.clip_skip)
            else:
                hidden = clip_hidden(embedder, ids, cfg.clip_skip)
            features.append(hidden)
        assert pooled is not None
        return torch.cat(features, dim=-1), pooled

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self.tokenize(prompts))
