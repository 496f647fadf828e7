"""A live `ldm serve` (uvicorn in a thread, on a free port) over the embedded model, shared by
the tests of a module."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ldm_cli.core.embedded import default_model_path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    def __init__(self, devices=("cpu",), credentials=None, models_dir=None, control_dir=None,
                 lora_dir=Path("models/Lora"), max_body=50 * 1024 * 1024):  # fmt: skip
        import uvicorn

        from ldm_cli.server.app import Settings
        from ldm_cli.server.launch import build

        settings = Settings(Path(lora_dir), control_dir, credentials, max_body)
        model = default_model_path()
        self.pool, self.app = build(model, settings, models_dir, "auto", None, list(devices))
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.pool.close()


@pytest.fixture(scope="module")
def live():
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = LiveServer()
    yield server
    server.close()
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous
