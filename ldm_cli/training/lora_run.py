"""`ldm train lora`: a LoRA trained on a folder of captioned images, written in kohya's format
(A1111, ComfyUI, diffusers' ``load_lora_weights`` read it) or diffusers/PEFT's."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from ldm_cli.training.adapter_data import load_concept_images
from ldm_cli.training.adapter_job import AdapterJob, base_model_version
from ldm_cli.training.adapter_stage import (
    AdapterTrainer,
    checkpoint_blocks,
    load_frozen_pipeline,
    preview_writer,
    train_adapter,
)
from ldm_cli.training.loop import is_main_process, note, wait_for_everyone
from ldm_cli.training.lora_network import LoraNetwork, LoraSpec

STAGE = "lora"


@dataclass(frozen=True)
class LoraJob:
    job: AdapterJob
    spec: LoraSpec
    layout: str = "kohya"  # or "peft"


def attached_network(lora: LoraJob):
    """(pipe, size, data, network, db): the frozen model, its training side, the folder's
    images, a fresh LoRA attached to the model, and the embeddings database that encodes text."""
    job = lora.job
    pipe = load_frozen_pipeline(job.model, job.threads)
    if job.checkpointing:
        checkpoint_blocks(pipe.model.unet)
    size = job.side(pipe)
    data = load_concept_images(job.data_dir, size, job.captions)
    network = LoraNetwork(pipe.model, lora.spec)
    network.reset(job.seed)
    network.to(pipe.device)
    network.attach(pipe.model)
    from ldm_cli.text.embeddings import EmbeddingDatabase

    db = EmbeddingDatabase.for_model(pipe.model.text_encoder, pipe.tokenizer)
    return pipe, size, data, network, db


def train_lora(lora: LoraJob) -> dict | None:
    """Train and write the LoRA; its summary, or None when stopped early (state saved)."""
    job, spec = lora.job, lora.spec
    job.check()
    spec.check()
    if job.out.suffix.lower() != ".safetensors":
        from ldm_cli.core.errors import UserError

        raise UserError("a LoRA is written as .safetensors")
    pipe, size, data, network, db = attached_network(lora)
    if spec.text_encoder:
        from ldm_cli.text.embeddings import encode_truncated

        unused = network.drop_unreached(
            pipe.model, lambda: encode_truncated(db, pipe.model.text_encoder, [data.captions[0]])
        )
        if unused:
            note(job.loop(), f"lora: {len(unused)} text-encoder layers left out (clip skip)")
    trainer = AdapterTrainer(network, pipe, db, spec.text_encoder, size)
    count = sum(p.numel() for p in network.parameters())
    note(job.loop(), f"lora: {len(network.layers)} layers, {count:,} parameters")
    sample = None
    if job.sample_prompts:
        sample = preview_writer(
            pipe, list(job.sample_prompts), job.run_dir / "samples", job.seed, size
        )
    fingerprint = job.fingerprint({"lora": spec.__dict__, "layout": lora.layout})
    result = train_adapter(
        STAGE, trainer, data, job.captions, job.loss, job.settings(), job.loop(), sample,
        fingerprint,
    )  # fmt: skip
    return finish_lora(network, lora, pipe, data, result, size)


def finish_lora(network, lora: LoraJob, pipe, data, result, size: int, digits: int = 5):
    """Detach the trained LoRA and write it (the main process; the others wait); its summary,
    or None when the run stopped early (state saved)."""
    network.detach_from(pipe.model)
    if not result.finished:
        return None
    if is_main_process():  # one writer; the others wait for the file
        write_lora(network, lora, pipe, data, result.step, size)
    wait_for_everyone()
    return {
        "layers": len(network.layers),
        "parameters": sum(p.numel() for p in network.parameters()),
        "final_loss": result.final_loss(digits),
        "file_kb": round(lora.job.out.stat().st_size / 1024, 1),
    }


def write_lora(network: LoraNetwork, lora: LoraJob, pipe, data, steps: int, size: int) -> None:
    """The file, with kohya's ``ss_*`` metadata and its addnet hash (``sshs_model_hash``)."""
    from ldm_cli.checkpoints.save import save_checkpoint
    from ldm_cli.networks.files import file_sha256

    job = lora.job
    tensors = network.tensors(lora.layout, job.torch_dtype())
    if lora.layout == "peft":
        save_checkpoint(tensors, job.out, metadata=network.peft_metadata())
        return
    metadata = kohya_metadata(lora, pipe, data, steps, size)
    pending = job.out.with_name(job.out.name + ".partial")
    save_checkpoint(tensors, pending, metadata=metadata)
    digest = file_sha256(pending, skip_header=True)  # the tensor bytes, as kohya hashes them
    pending.unlink()
    save_checkpoint(tensors, job.out, metadata={**metadata, "sshs_model_hash": digest})


def kohya_metadata(lora: LoraJob, pipe, data, steps: int, size: int) -> dict[str, str]:
    job, spec = lora.job, lora.spec
    tags: Counter = Counter()
    for caption in data.captions:
        tags.update(t.strip() for t in caption.split(",") if t.strip())
    network_args = {}
    if spec.modules == "locon":
        network_args = {"conv_dim": str(spec.rank), "conv_alpha": str(spec.alpha)}
    version = base_model_version(pipe.config)
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": spec.rank,
        "ss_network_alpha": spec.alpha,
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": not spec.text_encoder,
        "ss_base_model_version": version,
        "ss_v2": version == "sd_v2",
        "ss_sd_model_name": pipe.name,
        "ss_resolution": f"({size}, {size})",
        "ss_steps": steps,
        "ss_max_train_steps": job.steps,
        "ss_learning_rate": job.lr,
        "ss_unet_lr": job.lr,
        "ss_text_encoder_lr": job.lr if spec.text_encoder else 0,
        "ss_batch_size_per_device": job.batch_size,
        "ss_num_train_images": int(sum(data.repeats)),
        "ss_seed": job.seed,
        "ss_min_snr_gamma": job.loss.min_snr_gamma,
        "ss_noise_offset": job.loss.noise_offset or None,
        "ss_caption_dropout_rate": job.captions.dropout,
        "ss_shuffle_caption": job.captions.shuffle,
        "ss_keep_tokens": job.captions.keep_tokens,
        "ss_output_name": job.out.stem,
        "ss_tag_frequency": json.dumps({job.data_dir.name: dict(sorted(tags.items()))}),
        "ss_training_comment": "trained by ldm train lora",
        "ss_v_parameterization": pipe.config.prediction == "v",
    }
    return {key: str(value) for key, value in values.items()}
