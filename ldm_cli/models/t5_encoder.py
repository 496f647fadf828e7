"""FLUX.1's and SD3's T5 v1.1 encoder in plain PyTorch, equal to transformers' ``T5EncoderModel``.

The module tree, and so the state dict, is transformers' one: ``shared.weight`` (the token
embedding), ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`` (block 0 also
``...relative_attention_bias.weight``), ``encoder.block.N.layer.0.layer_norm.weight``,
``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``,
``encoder.block.N.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``: the keys of
``t5xxl_fp16.safetensors``. transformers' ``encoder.embed_tokens`` is the same tensor as
``shared`` (tied); it is no module here, and a file holding that alias as well loads too (the
alias is dropped).

Numerics follow transformers: RMS norms accumulate in fp32 and return the weight's dtype when
that is fp16/bf16; the attention is unscaled with the relative position bias (block 0's, reused
by every block) added to the scores; the gated feed-forward uses the tanh GELU ("gelu_new"); its
input is cast to ``wo``'s dtype, which transformers keeps in fp32 for fp16 models
(``_keep_in_fp32_modules``; :meth:`T5EncoderModel.to_dtype` does the same); fp16 hidden states
are clamped to the finite range after each sub-layer. No attention mask: FLUX and SD3 encode
the padded ids as they are. Nothing is initialised from data, so the model builds on the meta
device and loads with ``load_state_dict(..., assign=True)``; it has no buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.flow_config import T5Config
from ldm_cli.ops.conv_linear import Linear

TIED_KEYS = ("encoder.embed_tokens.weight",)  # transformers' alias of shared.weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, evaluated term by term in the input's dtype ("gelu_new")."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def relative_position_bucket(
    relative: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional buckets of ``key position - query position``: half the buckets per
    direction; of those, exact distances below a quarter of the buckets, then logarithmic bins
    up to `max_distance`, beyond which all share the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    direction = (relative > 0).long() * half
    distance = relative.abs()
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (half - exact)).long()).clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard for fp16 activations: infinities become finite (1000 below the
    largest value when any appear)."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    bound = torch.where(torch.isinf(x).any(), largest - 1000.0, largest)
    return x.clamp(min=-bound, max=bound)


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """``[1, heads, length, length]`` additive scores from the learned bucket biases."""
        table = self.relative_attention_bias.weight
        positions = torch.arange(length, device=table.device)
        relative = positions[None, :] - positions[:, None]  # key minus query
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q)
        out = F.scaled_dot_product_attention(
            q, heads(self.k), heads(self.v), attn_mask=bias.to(q.dtype), scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, relative_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """Token ids ``[B, L]`` -> last hidden state ``[B, L, d_model]`` (final-normed)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.feed_forward_proj != "gated-gelu":
            raise ValueError(f"only the gated-gelu T5 (v1.1) is built, not {cfg.feed_forward_proj}")
        if cfg.num_layers < 1:
            raise ValueError("a T5 encoder needs at least one block")
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)
        self.register_load_state_dict_pre_hook(_drop_tied_alias)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> T5EncoderModel:
        """Cast to `dtype` as transformers loads T5 in it: for fp16 the ``wo`` projections stay
        fp32 (T5 v1.1's feed-forward outputs overflow fp16)."""
        self.to(dtype)
        if dtype == torch.float16:
            for block in self.encoder.block:
                block.layer[1].DenseReluDense.wo.float()
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(input_ids))


def kept_in_fp32(key: str) -> bool:
    """Whether this state-dict key is one transformers keeps in fp32 for an fp16 model."""
    return key.endswith(".DenseReluDense.wo.weight")


def _drop_tied_alias(module, state_dict, prefix, *args) -> None:
    for key in TIED_KEYS:
        state_dict.pop(prefix + key, None)
