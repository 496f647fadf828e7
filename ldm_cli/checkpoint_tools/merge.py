"""`ldm merge A B -o OUT`: AUTOMATIC1111's checkpoint merger, tensor by tensor.

- weighted sum: ``A * (1 - alpha) + B * alpha``;
- add difference (``--add-difference C``): ``A + (B - C) * alpha``;

computed in float32 and stored in A's dtype (or `--dtype`). As in A1111, the tensors of A that
B (and C) lack are kept as they are in A, those only B or C hold are left out, and CLIP's
``position_ids`` and integer tensors are A's. Per-block weights (`block_weights`: supermerger's
IN00.., M00, OUT00..) give each U-Net block its own alpha; `alpha` stays that of every other
tensor (text encoder, VAE, the U-Net's time embedding and output layers).

One tensor of each input is read at a time (checkpoint_tools.sources) and the result written at once
(checkpoint_tools.stream_writer), so memory stays near the largest tensor times the inputs,
whatever the model's size. The recipe is recorded in OUT's metadata under ``ldm_merge``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.checkpoint_tools.sources import DTYPES, Source, cast, check_output, open_source
from ldm_cli.checkpoint_tools.stream_writer import OutTensor, write_streaming
from ldm_cli.core.errors import UserError

SKIPPED = re.compile(r".*\.position_ids$")  # A1111's checkpoint_dict_skip_on_merge
BLOCK = re.compile(
    r"^model\.diffusion_model\.(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\."
)


@dataclass(frozen=True)
class MergeJob:
    a: Path
    b: Path
    out: Path
    alpha: float = 0.5
    difference: Path | None = None  # C of add difference
    dtype: str | None = None
    block_weights: tuple[float, ...] | None = None

    @property
    def mode(self) -> str:
        return "weighted_sum" if self.difference is None else "add_difference"


def run_merge(job: MergeJob) -> Path:
    check_output(job.out, job.dtype)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(open_source(job.a, "A"))
        b = stack.enter_context(open_source(job.b, "B"))
        c = stack.enter_context(open_source(job.difference, "C")) if job.difference else None
        others = [b] if c is None else [b, c]
        for other in others:
            check_compatible(a, other)
        alphas = block_alphas(a, job.alpha, job.block_weights)
        tensors = {}
        for key, (stored, shape) in a.tensors.items():
            dtype = DTYPES[job.dtype] if job.dtype and a.is_float(key) else stored
            merged = all(key in o.tensors for o in others) and _mergeable(a, others, key)
            alpha = alphas(key)
            make = _merged(a, others, key, alpha, dtype) if merged else _kept(a, key, dtype)
            tensors[key] = OutTensor(dtype, shape, make)
        return write_streaming(job.out, tensors, _metadata(job, a, others))


def _mergeable(a: Source, others: list[Source], key: str) -> bool:
    return not SKIPPED.match(key) and all(s.is_float(key) for s in (a, *others))


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a * (1 - alpha) + b * alpha`` in float32 (in place on fresh copies: the same
    arithmetic with two temporaries instead of five)."""
    out = _wide(a).mul_(1 - alpha)
    return out.add_(_wide(b).mul_(alpha))


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a + (b - c) * alpha`` in float32."""
    difference = _wide(b).sub_(c.float()).mul_(alpha)
    return difference.add_(a.float())  # x + y == y + x, bit for bit


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32, copy=True)


def _merged(a: Source, others: list[Source], key: str, alpha: float, dtype: str):
    def make() -> torch.Tensor:
        tensors = [a.read(key), *(o.read(key) for o in others)]
        if len(tensors) == 2:
            return cast(weighted_sum(*tensors, alpha), dtype)
        return cast(add_difference(*tensors, alpha), dtype)

    return make


def _kept(a: Source, key: str, dtype: str):
    return lambda: cast(a.read(key), dtype)


def check_compatible(a: Source, b: Source) -> None:
    """A one-line error naming the first tensor (by name) whose shape differs, or, for models of
    different families, the first one that only one of them holds."""
    shared = sorted(set(a.tensors) & set(b.tensors))
    if not shared:
        raise UserError(
            f"cannot merge {a.name} and {b.name}: they have no tensor in common (first of "
            f"{a.name}: {next(iter(a.tensors))}, of {b.name}: {next(iter(b.tensors))})"
        )
    for key in shared:
        if a.tensors[key][1] != b.tensors[key][1]:
            raise UserError(
                f"cannot merge {a.name} and {b.name}: {key} is {list(a.tensors[key][1])} in "
                f"{a.name} and {list(b.tensors[key][1])} in {b.name} (models of different "
                f"families or sizes{_families(a, b)})"
            )
    kinds = (_family(a), _family(b))
    if None not in kinds and kinds[0] != kinds[1]:
        only = sorted(set(a.tensors) ^ set(b.tensors))
        first = only[0] if only else "none"
        raise UserError(
            f"cannot merge {a.name} ({kinds[0]}) and {b.name} ({kinds[1]}): first mismatched "
            f"key {first} (in one file only)"
        )


def _family(source: Source) -> str | None:
    try:
        return source.model_config().family
    except UserError:  # not a Stable Diffusion file ldm knows: compared by shapes only
        return None


def _families(a: Source, b: Source) -> str:
    kinds = (_family(a), _family(b))
    return f": {kinds[0]} and {kinds[1]}" if None not in kinds and kinds[0] != kinds[1] else ""


def block_name(key: str) -> str | None:
    """supermerger's name of the U-Net block a tensor belongs to (IN00, M00, OUT11), or None."""
    match = BLOCK.match(key)
    if match is None:
        return None
    if match.group(1) is None:
        return "M00"
    side = "IN" if match.group(1) == "input_blocks" else "OUT"
    return f"{side}{int(match.group(2)):02d}"


def block_alphas(a: Source, alpha: float, weights: tuple[float, ...] | None):
    """key -> its alpha: the block's weight for U-Net blocks when `weights` are given."""
    if weights is None:
        return lambda key: alpha
    found = {name for key in a.tensors if (name := block_name(key)) is not None}
    names = sorted(n for n in found if n.startswith("IN")) + ["M00"]
    names += sorted(n for n in found if n.startswith("OUT"))
    if not any(n.startswith("IN") for n in names):
        raise UserError(f"--block-weights: {a.name} has no U-Net blocks (input_blocks.N)")
    if len(weights) != len(names):
        raise UserError(
            f"--block-weights: {a.name} has {len(names)} U-Net blocks ({names[0]}..{names[-1]}; "
            f"SD 1.x/2.x: 25 values, SDXL: 19), got {len(weights)} values"
        )
    table = dict(zip(names, weights, strict=True))

    def alpha_of(key: str) -> float:
        name = block_name(key)
        return alpha if name is None else table[name]

    return alpha_of


def _metadata(job: MergeJob, a: Source, others: list[Source]) -> dict[str, str]:
    from ldm_cli.checkpoints.hash import model_hash

    def described(source: Source) -> dict:
        digest = None if source.path.is_dir() else model_hash(source.path)
        return {"name": source.name, "hash": digest}

    recipe = {
        "mode": job.mode,
        "alpha": job.alpha,
        "a": described(a),
        "b": described(others[0]),
        "c": described(others[1]) if len(others) > 1 else None,
        "dtype": job.dtype or "kept",
        "block_weights": list(job.block_weights) if job.block_weights else None,
        "formula": "A*(1-alpha)+B*alpha" if job.mode == "weighted_sum" else "A+(B-C)*alpha",
    }
    metadata = {"ldm_merge": json.dumps(recipe, sort_keys=True)}
    if "ldm_config" in a.metadata:  # the architecture is A's
        metadata["ldm_config"] = a.metadata["ldm_config"]
    return metadata
