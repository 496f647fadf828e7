"""The OpenCLIP text tower of SD 2.x, laid out like the original ``FrozenOpenCLIPEmbedder``.

Its state_dict keys are those a real checkpoint has after ``cond_stage_model.``: the text half of
open_clip's ``CLIP`` (the original deletes ``visual``), i.e. ``model.token_embedding.weight``,
``model.positional_embedding``, ``model.transformer.resblocks.N.{ln_1, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``model.ln_final``,
``model.text_projection`` and ``model.logit_scale``. The last two are unused for SD 2.x
conditioning but are stored in every original file, so they are loaded (strictly) all the same.
Plain PyTorch: generating never imports open_clip; the tests hold this against open_clip's model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.models.clip_text_model import ACTIVATIONS
from ldm_cli.ops.conv_linear import Linear, linear
from ldm_cli.text.tokenizer import get_tokenizer


class FusedSelfAttention(nn.Module):
    """Causal self-attention holding ``nn.MultiheadAttention``'s parameters (one fused
    ``in_proj_weight`` for q, k and v, then ``out_proj``), computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} attention heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {cfg.hidden_act}"
            )
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = FusedSelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg) for _ in range(cfg.num_hidden_layers)
        )


class OpenCLIPTextModel(nn.Module):
    """Token ids ``[B, L]`` -> (context ``[B, L, width]``, pooled ``[B, projection_dim]``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        width = cfg.hidden_size
        projection_dim = cfg.projection_dim if cfg.projection_dim is not None else width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(width, projection_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """open_clip's initialization distributions (not its random stream)."""
        width = self.ln_final.normalized_shape[0]
        blocks = self.transformer.resblocks
        proj_std = width**-0.5 * (2 * len(blocks)) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in blocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def forward(
        self, tokens: torch.Tensor, clip_skip: int = 1, with_pooled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final-layer-normed output of the ``clip_skip``-th block from the end (1 = last,
        2 = SD 2's "penultimate"), and, when asked, the pooled projection of the last block
        (ln_final at the end token, the highest id, then ``@ text_projection``)."""
        blocks = self.transformer.resblocks
        keep = len(blocks) - (clip_skip - 1)
        run = len(blocks) if with_pooled else keep
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[-1]]
        kept = None
        for index, block in enumerate(blocks[:run]):
            if index == keep:
                kept = x
            x = block(x)
        context = self.ln_final(x if kept is None else kept)
        if not with_pooled:
            return context, None
        last = context if kept is None else self.ln_final(x)
        rows = torch.arange(last.shape[0], device=last.device)
        pooled = last[rows, tokens.argmax(dim=-1).to(last.device)] @ self.text_projection
        return context, pooled


class OpenCLIPTextEncoder(nn.Module):
    """What the original ``FrozenOpenCLIPEmbedder`` was: a module whose ``model`` is the tower.

    ``cfg.clip_skip`` = k takes the k-th block from the end through ``ln_final``; SD 2.x
    presets use 2 (its "penultimate" layer). The interface is that of ``CLIPTextEncoder``.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if not 1 <= cfg.clip_skip <= cfg.num_hidden_layers:
            raise ValueError(
                f"clip_skip must be in 1..{cfg.num_hidden_layers}, got {cfg.clip_skip}"
            )
        self.cfg = cfg
        self.model = OpenCLIPTextModel(cfg)

    tower_key = "clip_g"  # what textual-inversion files call SDXL's second tower

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def materialize_buffers(self) -> None:
        """Nothing to do: the causal mask is SDPA's ``is_causal``, never a buffer."""

    def forward_with_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, pooled = self.model(tokens, self.cfg.clip_skip, with_pooled=True)
        assert pooled is not None
        return context, pooled

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self.cfg.clip_skip)[0]

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_pooled(tokens)[1]

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        tokens = get_tokenizer(self.cfg.pad_token_id)(prompts)
        return tokens.to(self.model.token_embedding.weight.device)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        return self(self.tokenize(prompts))
