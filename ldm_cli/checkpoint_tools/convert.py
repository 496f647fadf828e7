"""`ldm convert IN OUT`: a checkpoint rewritten as a `.safetensors` file (or a diffusers folder),
optionally cast, pruned, with a VAE and LoRAs baked in.

Each output tensor is made when the writer reaches it (read from IN, changed, cast) and dropped
once written, so a single-file output never holds the model twice. What was done is recorded
in the output's metadata under ``ldm_convert`` (JSON: source name and A1111 hash, dtype, prune,
ema, vae, loras); IN's own metadata is kept beside it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.checkpoint_tools.bake_lora import LoraBake
from ldm_cli.checkpoint_tools.bake_vae import vae_tensors
from ldm_cli.checkpoint_tools.prune import kept_keys
from ldm_cli.checkpoint_tools.sources import DTYPES, Source, cast, check_output, open_source
from ldm_cli.checkpoint_tools.stream_writer import OutTensor, write_streaming

SINGLE_FILE = ".safetensors"


@dataclass(frozen=True)
class ConvertJob:
    source: Path
    out: Path
    dtype: str | None = None  # "fp32", "fp16" or "bf16"; None keeps each tensor's
    prune: bool = False
    ema: bool = False
    vae: Path | None = None
    loras: tuple[tuple[Path, float], ...] = ()


def writes_folder(out: Path) -> bool:
    """OUT ending in .safetensors is a single file; any other name a diffusers folder."""
    return Path(out).suffix.lower() != SINGLE_FILE


def run_convert(job: ConvertJob) -> Path:
    check_output(job.out, job.dtype)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(job.source, "IN"))
        keys = kept_keys(source.tensors, job.prune, job.ema, source.name)
        vae = stack.enter_context(vae_tensors(job.vae, source)) if job.vae else {}
        lora = LoraBake(source, list(job.loras)) if job.loras else None
        tensors = {}
        for out_key, source_key in keys.items():
            stored, shape = source.tensors[source_key]
            read = _reader(source, source_key)
            if out_key in vae:  # the baked VAE's tensor, in the dtype of the one it replaces
                stored = source.tensors[out_key][0]
                read = vae[out_key]
            float_tensor = source.is_float(source_key)
            dtype = DTYPES[job.dtype] if job.dtype and float_tensor else stored
            change = lora.apply if lora is not None and lora.changes(out_key) else None
            tensors[out_key] = OutTensor(dtype, shape, _made(out_key, read, change, dtype))
        if writes_folder(job.out):
            return _to_folder(source, tensors, job.out)
        return write_streaming(job.out, tensors, _metadata(job, source))


def _reader(source: Source, key: str) -> Callable[[], torch.Tensor]:
    return lambda: source.read(key)


def _made(key: str, read, change, dtype: str) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        tensor = read()
        if change is not None:
            tensor = change(key, tensor)
        return cast(tensor, dtype)

    return make


def _to_folder(source: Source, tensors: dict[str, OutTensor], out: Path) -> Path:
    """A diffusers folder: the converted tensors renamed by checkpoint_tools.diffusers_folder
    (all in memory: diffusers' layout splits and renames them)."""
    from ldm_cli.checkpoint_tools.diffusers_folder import write_diffusers_folder

    cfg = source.model_config()
    state = {key: entry.make() for key, entry in tensors.items()}
    return write_diffusers_folder(state, cfg, out)


def _metadata(job: ConvertJob, source: Source) -> dict[str, str]:
    from ldm_cli.checkpoints.detect import config_to_json
    from ldm_cli.networks.files import lora_hash

    metadata = dict(source.metadata)
    if source.config is not None and "ldm_config" not in metadata:
        metadata["ldm_config"] = config_to_json(source.config)  # a folder's, exact
    record = {
        "source": source.name,
        "source_hash": _file_hash(source.path),
        "dtype": job.dtype or "kept",
        "pruned": job.prune,
        "ema": job.ema,
        "vae": None if job.vae is None else {"name": job.vae.name, "hash": _file_hash(job.vae)},
        "loras": [
            {"name": Path(path).name, "hash": lora_hash(Path(path)), "weight": weight}
            for path, weight in job.loras
        ],
    }
    metadata["ldm_convert"] = json.dumps(record, sort_keys=True)
    return metadata


def _file_hash(path: Path) -> str | None:
    """A1111's AutoV2 hash of a file (None for a folder)."""
    from ldm_cli.checkpoints.hash import model_hash

    return None if Path(path).is_dir() else model_hash(path)
