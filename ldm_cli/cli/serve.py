"""`ldm serve`: AUTOMATIC1111's HTTP API (/sdapi/v1) over ldm (ldm_cli.server; docs/serve.md).
torch, FastAPI and uvicorn are imported inside the command only."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import typer

from ldm_cli.cli.networks import EMBEDDINGS, LORA_DIR
from ldm_cli.core.errors import UserError


def serve(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Checkpoint served first (default: the embedded model)."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(7860, "--port", help="TCP port (A1111's is 7860)."),
    api_auth: str | None = typer.Option(
        None,
        "--api-auth",
        help="USER:PASSWORD (several separated by commas): HTTP basic auth on every route.",
    ),
    models_dir: Path | None = typer.Option(
        None,
        "--models-dir",
        help="Folder of checkpoints clients can switch to (sd_model_checkpoint).",
    ),
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
    controlnet_dir: Path | None = typer.Option(
        None,
        "--controlnet-dir",
        help="Folder of the ControlNets that alwayson_scripts.controlnet units name.",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Device workers, each with its own copy of the model: N GPUs (cuda:0..N-1), or "
        "N workers sharing the CPU. Jobs wait in one queue.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    max_body_mb: float = typer.Option(
        50, "--max-body-mb", help="Largest request body accepted, in MB (base64 images)."
    ),
) -> None:
    """Serve AUTOMATIC1111's HTTP API (txt2img, img2img, progress, ...) for its clients."""
    credentials = _checked(host, port, api_auth, workers, max_body_mb, device, dtype)
    for name, folder in (("--models-dir", models_dir), ("--controlnet-dir", controlnet_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{name} {folder}: no such folder")
    if embeddings is not None and not embeddings.is_dir():
        raise UserError(f"--embeddings {embeddings}: no such folder")
    launched = launched_workers(workers)
    if launched == 0:
        return  # another process of `accelerate launch` serves this machine's GPUs
    workers = launched
    from ldm_cli.core.embedded import default_model_path

    path = default_model_path() if model is None else model
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    from ldm_cli.checkpoints.file import read_header

    read_header(path)  # not a checkpoint: a one-line error before torch is imported
    if credentials is None and not _loopback(host):
        print(f"warning: listening on {host} without --api-auth", file=sys.stderr)

    check_port_free(host, port)
    from ldm_cli.server.app import Settings
    from ldm_cli.server.launch import build, worker_devices
    from ldm_cli.server.launch import serve as run

    settings = Settings(lora_dir, controlnet_dir, credentials, int(max_body_mb * 1024 * 1024))
    devices = worker_devices(device, workers)
    pool, app = build(path, settings, models_dir, dtype, embeddings, devices)
    run(app, pool, host, port)


def launched_workers(workers: int) -> int:
    """Under `accelerate launch` (N processes on this machine), the machine's first process
    serves with one worker per process's GPU and the others step aside (0): one port, one
    queue, `--workers N` by another name. Outside it, `workers` as given."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local <= 1:
        return workers
    if workers not in (1, local):
        raise UserError(
            f"--workers {workers} under accelerate launch with {local} processes: leave "
            "--workers out (one worker per process) or start ldm serve once without accelerate"
        )
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        print(
            "ldm serve: the first process of accelerate launch serves every GPU of this "
            "machine; this one has nothing to do",
            file=sys.stderr,
        )
        return 0
    return local


def _checked(host, port, api_auth, workers, max_body_mb, device, dtype):
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not max_body_mb > 0:
        raise UserError(f"--max-body-mb must be positive, got {max_body_mb}")
    if not host.strip():
        raise UserError("--host must not be empty")
    from ldm_cli.cli.generate import check_device_options

    check_device_options(device, dtype)
    if api_auth is None:
        return None
    from ldm_cli.server.guard import parse_credentials

    return parse_credentials(api_auth)


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's after the models have loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--host {host}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
