"""Everything `ldm serve` does after its options are checked: the device list, the model on
each device, the application, and uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

from ldm_cli.core.errors import UserError
from ldm_cli.server.app import Settings, create_app
from ldm_cli.server.checkpoints import Checkpoints
from ldm_cli.server.workers import WorkerPool


def worker_devices(device: str, workers: int) -> list[str]:
    """One device name per worker: CUDA GPUs cuda:0..N-1 (one model on each), or N workers
    sharing the CPU (or MPS)."""
    import torch

    from ldm_cli.core.devices import resolve_device

    where = resolve_device(device)
    if where.type != "cuda":
        return [str(where)] * workers
    if where.index is not None:
        if workers > 1:
            raise UserError(f"--device {device} is one GPU; use --device cuda with --workers")
        return [str(where)]
    count = torch.cuda.device_count()
    if workers > count:
        raise UserError(f"--workers {workers} needs {workers} GPUs; this machine has {count}")
    return [f"cuda:{k}" for k in range(workers)]


def opener(dtype: str, lora_dir: Path, embeddings: Path | None):
    """(checkpoint, device) -> pipeline, opened as `ldm generate` opens it (the same defaults),
    with the LoRA folder and embeddings of the command line."""

    def open_pipeline(path: Path, device: str):
        from ldm_cli.pipeline.load import load

        pipe = load(path, device, None if dtype == "auto" else dtype)
        pipe.networks.lora_dir = Path(lora_dir)
        if embeddings is not None:
            pipe.networks.load_embeddings(embeddings)
        return pipe

    return open_pipeline


def build(model: Path, settings: Settings, models_dir, dtype, embeddings, devices):
    """The started pool and the application over it."""
    pool = WorkerPool(opener(dtype, settings.lora_dir, embeddings), devices, model)
    pool.start()
    return pool, create_app(pool, Checkpoints(model, models_dir), settings)


def serve(app, pool: WorkerPool, host: str, port: int) -> None:
    import uvicorn

    # Ctrl-C: jobs still running after 5 s are cancelled (pool.close stops them at a step)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5
    )
    print(
        f"ldm serve: http://{host}:{port}/sdapi/v1 ({len(pool.workers)} worker(s))", file=sys.stderr
    )
    try:
        uvicorn.Server(config).run()
    finally:
        pool.close()
