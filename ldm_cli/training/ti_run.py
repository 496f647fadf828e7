"""`ldm train ti`: a textual-inversion embedding (new token vectors, the model untouched)
trained on a folder of captioned images, written in A1111's format.

The vectors start from the token embeddings of ``--init-word`` (spread over ``--vectors`` as
A1111 does: vector i is the init word's token ``i * tokens // vectors``); they enter the text
encoder wherever the token's name stands in a caption, through the embeddings database that
``ldm generate --embeddings`` uses, so what is trained is exactly what generation reads.

Files: ``.safetensors`` with ``emb_params`` [n, width] (SD 1.x/2.x) or ``clip_l``/``clip_g``
(SDXL); ``.pt`` with A1111's ``string_to_param``/``string_to_token``/``name``/``step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm_cli.core.errors import UserError
from ldm_cli.training.adapter_data import load_concept_images
from ldm_cli.training.adapter_job import AdapterJob
from ldm_cli.training.adapter_stage import (
    AdapterTrainer,
    checkpoint_blocks,
    load_frozen_pipeline,
    preview_writer,
    train_adapter,
)
from ldm_cli.training.loop import is_main_process, note, wait_for_everyone

STAGE = "ti"
TOWER_PARAM = {"*": "single"}  # a ParameterDict key may not be "*"


@dataclass(frozen=True)
class TiJob:
    job: AdapterJob
    token: str
    init_word: str = "*"
    vectors: int = 1


class TokenVectors(nn.Module):
    """The trainable vectors of one token, per text tower."""

    def __init__(self, initial: dict[str, torch.Tensor]):
        super().__init__()
        self.towers = nn.ParameterDict(
            {TOWER_PARAM.get(k, k): nn.Parameter(v.clone()) for k, v in initial.items()}
        )

    def by_tower(self) -> dict[str, torch.Tensor]:
        back = {v: k for k, v in TOWER_PARAM.items()}
        return {back.get(k, k): p for k, p in self.towers.items()}


def initial_vectors(pipe, init_word: str, count: int) -> dict[str, torch.Tensor]:
    from ldm_cli.text.embeddings import towers

    ids = pipe.tokenizer.encode_ids(init_word)
    if not ids:
        raise UserError(f"--init-word {init_word!r} gives no tokens")
    out = {}
    for key, table in towers(pipe.model.text_encoder):
        rows = table.weight.detach()[torch.tensor(ids)]
        out[key] = torch.stack([rows[i * len(ids) // count] for i in range(count)]).float()
    return out


def train_ti(ti: TiJob) -> dict | None:
    """Train and write the embedding; its summary, or None when stopped early."""
    job = ti.job
    job.check()
    if not ti.token.strip() or any(c in ti.token for c in "<>:()[]{}|,"):
        raise UserError(f"--token {ti.token!r}: use a plain word (no brackets or separators)")
    if ti.token != job.out.stem:
        raise UserError(
            f"-o {job.out.name}: name the file {ti.token}{job.out.suffix} (an embedding's name in "
            "prompts is its file name, in ldm as in A1111)"
        )
    if not 1 <= ti.vectors <= 75:
        raise UserError(f"--vectors must be 1 to 75, not {ti.vectors}")
    pipe = load_frozen_pipeline(job.model, job.threads)
    if job.checkpointing:
        checkpoint_blocks(pipe.model.unet)
    captions = job.captions if job.captions.name else _named(job, ti.token)
    size = job.side(pipe)
    data = load_concept_images(job.data_dir, size, captions)
    vectors = TokenVectors(initial_vectors(pipe, ti.init_word, ti.vectors)).to(pipe.device)
    db = _database(pipe, ti.token, vectors, job)
    if not any(db.used_in([c], 1) for c in data.captions):
        raise UserError(
            f"no caption in {job.data_dir} holds the token {ti.token!r} (or [name]); the "
            "embedding would learn nothing"
        )
    trainer = AdapterTrainer(vectors, pipe, db, True, size)
    note(job.loop(), f"ti: {ti.vectors} vector(s) of {ti.token!r}, from {ti.init_word!r}")

    def use_embedding() -> None:
        pipe.networks.embeddings = db

    sample = None
    if job.sample_prompts:
        folder = job.run_dir / "samples"
        sample = preview_writer(
            pipe, list(job.sample_prompts), folder, job.seed, size, use_embedding
        )
    fingerprint = job.fingerprint(
        {"token": ti.token, "init_word": ti.init_word, "vectors": ti.vectors}
    )
    result = train_adapter(
        STAGE, trainer, data, captions, job.loss, job.settings(), job.loop(), sample, fingerprint
    )
    if not result.finished:
        return None
    if is_main_process():  # one writer; the others wait for the file
        write_embedding(vectors, ti, pipe, result.step)
    wait_for_everyone()
    return {
        "vectors": ti.vectors,
        "final_loss": result.final_loss(),
        "file_kb": round(job.out.stat().st_size / 1024, 1),
    }


def _named(job: AdapterJob, token: str):
    from dataclasses import replace

    return replace(job.captions, name=token)


def _database(pipe, token: str, vectors: TokenVectors, job: AdapterJob):
    from ldm_cli.text.embeddings import EmbeddingDatabase

    db = EmbeddingDatabase.for_model(pipe.model.text_encoder, pipe.tokenizer)
    if not db.add(token, job.out, vectors.by_tower()):
        raise UserError(f"--token {token!r}: {db.skipped.get(token, 'cannot be used')}")
    return db


def write_embedding(vectors: TokenVectors, ti: TiJob, pipe, steps: int) -> None:
    job = ti.job
    dtype = job.torch_dtype()
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in vectors.by_tower().items()}
    if set(tensors) == {"*"}:
        tensors = {"emb_params": tensors["*"]}
    if job.out.suffix.lower() == ".safetensors":
        from ldm_cli.checkpoints.save import save_checkpoint

        save_checkpoint(tensors, job.out, metadata={"name": ti.token, "step": str(steps)})
        return
    if "emb_params" in tensors:
        first = pipe.tokenizer.encode_ids(ti.token)[0]
        content = {
            "string_to_token": {"*": first},
            "string_to_param": {"*": tensors["emb_params"]},
            "name": ti.token,
            "step": steps,
            "sd_checkpoint_name": pipe.name,
        }
    else:
        content = dict(tensors)
    pending = job.out.with_name(job.out.name + ".partial")
    torch.save(content, pending)
    pending.replace(job.out)
