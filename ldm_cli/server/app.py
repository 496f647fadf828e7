"""The FastAPI application: A1111's /sdapi/v1 routes over a WorkerPool.

A generation route checks its body (a 422 from the schema, a 400 naming the field from
`translate`), queues the job, and waits for it while watching the connection: a client that
goes away gets its job taken out of the queue, or stopped at the next step. Errors are JSON,
never a traceback: UserError -> 400, anything unexpected -> 500 (the traceback goes to the
server's log).
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ldm_cli.core.errors import UserError, out_of_memory_message
from ldm_cli.server import responses
from ldm_cli.server.checkpoints import Checkpoints
from ldm_cli.server.guard import Guard
from ldm_cli.server.images import decode_image
from ldm_cli.server.listings import add_listings
from ldm_cli.server.sampling_names import sampler_items, scheduler_items
from ldm_cli.server.schemas import (
    ImagesResponse,
    Img2ImgRequest,
    PngInfoRequest,
    ProgressResponse,
    Txt2ImgRequest,
)
from ldm_cli.server.translate import img2img_work, txt2img_work
from ldm_cli.server.workers import WorkerPool

MAX_BODY = 50 * 1024 * 1024  # bytes; --max-body-mb
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


@dataclass
class Settings:
    lora_dir: Path
    control_dir: Path | None = None
    credentials: list[tuple[str, str]] | None = None
    max_body: int = MAX_BODY


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": "HTTPException", "detail": detail})


def create_app(pool: WorkerPool, checkpoints: Checkpoints, settings: Settings):
    """The ASGI application: the routes behind the auth and body-size guard."""
    app = FastAPI(title="ldm serve", description="AUTOMATIC1111's /sdapi/v1 API over ldm")
    pool.resolve = checkpoints.find
    options: dict[str, Any] = {"samples_format": "png"}

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        return _error(400, str(error))

    async def generate(request: Request, body, make_work) -> JSONResponse:
        try:
            work = await run_in_threadpool(make_work, body, settings.control_dir)
            job = pool.submit(work, body.force_task_id)
        except UserError as error:
            return _error(400, str(error))
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL)
            if not waiting.done() and await request.is_disconnected():
                pool.cancel(job)
                return _error(499, "the client closed the connection")
        try:
            pairs = waiting.result()
        except asyncio.CancelledError:
            return _error(499, "the job was cancelled")
        except UserError as error:
            return _error(400, str(error))
        except MemoryError:
            return _error(500, "out of memory; try a smaller size or batch_size")
        except Exception as error:  # logged by the worker; the client gets one line
            message = out_of_memory_message(error)  # torch's, or the CPU allocator's
            if message is not None:
                return _error(500, message)
            return _error(500, f"internal error ({type(error).__name__}); see the server log")
        path = job.model_path or pool.model
        digest = pool_hash(path)
        content = await run_in_threadpool(
            responses.images_response, body, pairs, Path(path).stem, digest
        )
        return JSONResponse(content)

    def pool_hash(path) -> str | None:
        for worker in pool.workers:
            if worker.path == Path(path) and worker.pipe is not None:
                checkpoints.hashes[Path(path)] = worker.pipe.model_hash
        return checkpoints.hashes.get(Path(path))

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(request: Request, body: Txt2ImgRequest):
        return await generate(request, body, txt2img_work)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(request: Request, body: Img2ImgRequest):
        return await generate(request, body, img2img_work)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False, id_task: str | None = None):
        running = pool.running()
        job = next((j for j in running if j.id == id_task), None) if id_task else None
        job = job or (running[0] if running else None)
        position = pool.position(id_task) if id_task else None
        return responses.progress(job, len(pool.queued()), position, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        pool.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        pool.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        for path in {w.path for w in pool.workers if w.path is not None}:
            pool_hash(path)
        return checkpoints.items()

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return {}

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return sampler_items()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return scheduler_items()

    @app.get("/sdapi/v1/options")
    def get_options():
        pool_hash(pool.model)
        return {**options, "sd_model_checkpoint": checkpoints.title(pool.model)}

    @app.post("/sdapi/v1/options")
    def set_options(body: dict[str, Any] = Body(...)):
        name = body.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise UserError("sd_model_checkpoint must be text")
            pool.model = checkpoints.find(name)
        options.update({k: v for k, v in body.items() if k != "sd_model_checkpoint"})
        return None

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoRequest):
        return responses.png_info(decode_image(body.image, "image"))

    add_listings(app, settings.lora_dir, settings.control_dir)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        traceback.print_exception(error, file=sys.stderr)
        return _error(500, f"internal error ({type(error).__name__}); see the server log")

    return Guard(app, settings.credentials, settings.max_body)  # .app: the FastAPI app
