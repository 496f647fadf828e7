"""The CLIP ViT-L/14 text encoder of SD 1.x, laid out like the original ``FrozenCLIPEmbedder``.

Its state_dict keys are those a real checkpoint has after ``cond_stage_model.``:
``transformer.text_model.embeddings...``, ``transformer.text_model.encoder.layers.N...``,
``transformer.text_model.final_layer_norm...``. transformers 5's ``CLIPTextModel`` holds the
embeddings/encoder/final_layer_norm itself (4.x nested them under ``text_model``), so it is
wrapped in a holder module that supplies the ``text_model`` level.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_cli.config import TextConfig
from ldm_cli.tokenizer import get_tokenizer

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407


def clip_text_config(cfg: TextConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=BOS_TOKEN_ID,
        # The real id, so the pooled output is taken at the first end token.
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa",
    )


class TextModelHolder(nn.Module):
    """The ``transformers.CLIPTextModel`` the original ``transformer`` attribute held."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(config)


class CLIPTextEncoder(nn.Module):
    """Token ids ``[B, 77]`` -> context ``[B, 77, hidden]`` for the UNet's cross-attention.

    ``cfg.clip_skip`` = k > 1 takes the output of the k-th layer from the end and passes it
    through the final layer norm (the A1111/ComfyUI "CLIP skip" convention).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if not 1 <= cfg.clip_skip <= cfg.num_hidden_layers:
            raise ValueError(
                f"clip_skip must be in 1..{cfg.num_hidden_layers}, got {cfg.clip_skip}"
            )
        self.cfg = cfg
        self.transformer = TextModelHolder(clip_text_config(cfg))
        self.register_load_state_dict_post_hook(_reset_position_ids_after_load)

    @property
    def text_model(self) -> CLIPTextModel:
        return self.transformer.text_model

    def materialize_buffers(self) -> None:
        """Set ``position_ids`` (not in the state_dict) to ``arange`` beside the weights.

        A model built on the meta device and loaded with ``assign=True``, or moved with
        ``to_empty``, would otherwise keep a meta or uninitialized buffer.
        """
        embeddings = self.text_model.embeddings
        device = embeddings.token_embedding.weight.device
        length = embeddings.position_ids.shape[-1]
        embeddings.position_ids = torch.arange(length, device=device).unsqueeze(0)

    def forward_with_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context and the pooled output: the final-layer-normed last layer at the first
        end token (transformers' ``pooler_output``; SDXL needs it)."""
        skip = self.cfg.clip_skip
        output = self.text_model(input_ids=tokens, output_hidden_states=skip > 1)
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


def _reset_position_ids_after_load(module: CLIPTextEncoder, incompatible_keys) -> None:
    if module.text_model.embeddings.token_embedding.weight.device.type != "meta":
        module.materialize_buffers()
