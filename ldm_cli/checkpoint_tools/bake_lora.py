"""`ldm convert --lora FILE:W`: LoRAs merged into a checkpoint's weights (A1111's "merge LoRA
into checkpoint").

The files are read and matched to the model's layers by the code `--lora` uses at generate time
(networks.files, networks.keys: kohya/A1111 and diffusers/PEFT names, LoCon, LyCORIS LoHa/LoKr,
DoRA), and each weight's change is `networks.lora.lora_deltas`, the function that patches a
loaded model, called for one weight at a time so that only that weight and its change are in
memory. The changes of several files add up in the order given (a DoRA layer sees the weight
with the earlier changes, as in A1111), in float32: the written weight is
``(weight.float() + change)`` in the output dtype, which for an fp32 output is what
``--lora FILE:W`` makes of the weight in fp32 (on the CPU). W multiplies both the text encoder's
and the U-Net's layers, as ``--lora FILE:W`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.checkpoint_tools.sources import Source
from ldm_cli.networks.files import LoraFile, read_lora
from ldm_cli.networks.lora import lora_deltas, warn_unmatched


class _OneWeight:
    """What `lora_deltas` reads of a model, its named parameters: here the one weight in hand."""

    def __init__(self, key: str, tensor: torch.Tensor) -> None:
        self._items = [(key, tensor)]

    def named_parameters(self):
        return iter(self._items)


class LoraBake:
    """The LoRA files of one conversion, grouped by the weight they change."""

    def __init__(self, checkpoint: Source, loras: list[tuple[Path, float]]) -> None:
        from ldm_cli.checkpoints.pickled import allow_pickle
        from ldm_cli.models.loading import build_empty
        from ldm_cli.networks.keys import layer_table

        table = layer_table(build_empty(checkpoint.model_config()))  # meta: names, no weights
        self._by_weight: dict[str, list[tuple[LoraFile, float, float]]] = {}
        for path, weight in loras:
            with allow_pickle():  # weights-only, as the checkpoint itself
                lora = read_lora(Path(path), table)
            warn_unmatched(lora)
            layers: dict[str, list] = {}
            for layer in lora.layers:
                layers.setdefault(layer.target.param, []).append(layer)
            for key, own in layers.items():
                part = LoraFile(lora.path, own, [], lora.metadata)
                self._by_weight.setdefault(key, []).append((part, weight, weight))
        absent = sorted(k for k in self._by_weight if k not in checkpoint.tensors)
        if absent:  # the model built from the checkpoint has a weight the file lacks
            raise RuntimeError(f"internal error: LoRA target {absent[0]} is not in the file")

    def changes(self, key: str) -> bool:
        return key in self._by_weight

    @torch.no_grad()
    def apply(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with the LoRAs' change, in float32."""
        base = weight.float()
        delta = lora_deltas(_OneWeight(key, base), self._by_weight[key])[key]
        return base + delta
