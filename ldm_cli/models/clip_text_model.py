"""CLIP's text transformer in plain PyTorch, a drop-in for transformers 5's ``CLIPTextModel``.

The module tree, and so the state_dict (``embeddings.token_embedding.weight``,
``encoder.layers.N.self_attn.q_proj.weight``, ``final_layer_norm.bias``, ...), and the numerics
are those of transformers' model, which the tests hold it against. Importing transformers costs
seconds of start-up; this costs nothing beyond torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.config import TextConfig
from ldm_cli.ops.conv_linear import Linear

EOS_TOKEN_ID = 49407


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """The final-layer-normed output of the last layer, ``[B, L, hidden]``."""
    pooler_output: torch.Tensor
    """``last_hidden_state`` at each sequence's first end token, ``[B, hidden]``."""
    hidden_states: tuple[torch.Tensor, ...] | None
    """The embeddings, then each layer's output (not normed); only when asked for."""


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    @property
    def position_ids(self) -> torch.Tensor:
        """``[1, max_positions]`` arange. transformers keeps it as a buffer; computing it means
        nothing is left on the meta device after ``load_state_dict(assign=True)``."""
        weight = self.position_embedding.weight
        return torch.arange(weight.shape[0], device=weight.device).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"{length} tokens exceed the {self.position_embedding.num_embeddings} positions"
            )
        positions = torch.arange(length, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} is not a multiple of "
                f"{cfg.num_attention_heads} attention heads"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        # Declared in transformers' order, so named_parameters() lists the same sequence.
        self.k_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
            is_causal=True, scale=self.scale,
        )  # fmt: skip
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {cfg.hidden_act}"
            )
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm block: causal self-attention, then the MLP, each added to its input."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """Token ids ``[B, L]`` (L <= ``max_position_embeddings``) -> :class:`CLIPTextOutput`."""

    def __init__(self, cfg: TextConfig, eos_token_id: int = EOS_TOKEN_ID):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.eos_token_id = eos_token_id
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' initialization, with its random draws in its order: a model built
        after ``torch.manual_seed(s)`` equals transformers' ``CLIPTextModel`` built after the
        same seed, and so trains from scratch exactly as before.

        transformers first gives every Linear and Embedding N(0, 0.02), then its CLIP modules
        draw their own weights again; the discarded first draws keep the random stream aligned.
        """
        width = self.final_layer_norm.normalized_shape[0]
        in_std = width**-0.5 * (2 * len(self.encoder.layers)) ** -0.5
        embeddings = (self.embeddings.token_embedding, self.embeddings.position_embedding)
        for embedding in (*embeddings, *embeddings):
            nn.init.normal_(embedding.weight, std=0.02)
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _linear_init(attn.k_proj, attn.v_proj, attn.q_proj, attn.out_proj)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(linear.weight, std=in_std)
            nn.init.normal_(attn.out_proj.weight, std=width**-0.5)
            _linear_init(mlp.fc1, mlp.fc2)
            nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(mlp.fc2.weight, std=in_std)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(
        self, input_ids: torch.Tensor, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        hidden = self.embeddings(input_ids)
        all_hidden = [hidden]
        for layer in self.encoder.layers:
            hidden = layer(hidden)
            all_hidden.append(hidden)
        last = self.final_layer_norm(hidden)
        # argmax returns the first maximum: the first end token, whether the padding is more
        # end tokens (SD 1.x) or zeros (open_clip); position 0 for a sequence without one.
        end = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), end.to(last.device)]
        return CLIPTextOutput(last, pooled, tuple(all_hidden) if output_hidden_states else None)


def _linear_init(*linears: nn.Linear) -> None:
    for linear in linears:
        nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
