"""The CLIP ViT-L/14 text encoder of SD 1.x, laid out like the original ``FrozenCLIPEmbedder``.

Its state_dict keys are those a real checkpoint has after ``cond_stage_model.``:
``transformer.text_model.embeddings...``, ``transformer.text_model.encoder.layers.N...``,
``transformer.text_model.final_layer_norm...``. The original's ``transformer`` was a
transformers ``CLIPTextModel``; here it is a holder of our plain-PyTorch copy of that model
(:mod:`ldm_cli.models.clip_text_model`), so generating never imports transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.models.clip_text_model import EOS_TOKEN_ID, CLIPTextModel
from ldm_cli.text.tokenizer import get_tokenizer

BOS_TOKEN_ID = 49406


class TextModelHolder(nn.Module):
    """What the original ``transformer`` attribute was: a module with a ``text_model``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(cfg, eos_token_id=EOS_TOKEN_ID)


class CLIPTextEncoder(nn.Module):
    """Token ids ``[B, 77]`` -> context ``[B, 77, hidden]`` for the UNet's cross-attention.

    ``cfg.clip_skip`` = k > 1 takes the output of the k-th layer from the end and passes it
    through the final layer norm (the A1111/ComfyUI "CLIP skip" convention).
    """

    tower_key = "clip_l"  # what textual-inversion files call this tower (SDXL's first)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if not 1 <= cfg.clip_skip <= cfg.num_hidden_layers:
            raise ValueError(
                f"clip_skip must be in 1..{cfg.num_hidden_layers}, got {cfg.clip_skip}"
            )
        self.cfg = cfg
        self.transformer = TextModelHolder(cfg)

    @property
    def text_model(self) -> CLIPTextModel:
        return self.transformer.text_model

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def materialize_buffers(self) -> None:
        """Kept for callers that load with ``assign=True``: there is nothing to materialize, as
        the position ids are computed where they are used, never stored."""

    def forward_with_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context and the pooled output: the final-layer-normed last layer at the first
        end token (transformers' ``pooler_output``; SDXL needs it)."""
        skip = self.cfg.clip_skip
        output = self.text_model(tokens, output_hidden_states=skip > 1)
        if skip == 1:
            context = output.last_hidden_state
        else:
            context = self.text_model.final_layer_norm(output.hidden_states[-skip])
        return context, output.pooler_output

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_pooled(tokens)[0]

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_pooled(tokens)[1]

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        tokens = get_tokenizer(self.cfg.pad_token_id)(prompts)
        return tokens.to(self.text_model.embeddings.token_embedding.weight.device)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> context, like ``FrozenCLIPEmbedder.encode``."""
        return self(self.tokenize(prompts))
