"""`ldm serve` as a user runs it: help without torch, one-line errors for bad options, and a
real server process behind --api-auth that stops cleanly on Ctrl-C. RUNNER is `ldm` that also
says on stderr whether torch was imported."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ldm_cli.core.errors import UserError
from tests.server.conftest import free_port

RUNNER = (
    "import sys\n"
    "from ldm_cli.cli import main\n"
    "sys.argv = ['ldm', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def ldm_serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", RUNNER, "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


def test_help_does_not_import_torch():
    proc = ldm_serve("--help")
    assert proc.returncode == 0
    assert "--api-auth" in proc.stdout and "--models-dir" in proc.stdout
    assert proc.stderr.strip() == "no torch"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--api-auth", "nocolon"),
            "--api-auth must be USER:PASSWORD (several separated by commas)",
        ),
        (("--port", "70000"), "--port must be between 1 and 65535, got 70000"),
        (("--workers", "0"), "--workers must be at least 1, got 0"),
        (("--model", "missing.safetensors"), "model not found: missing.safetensors"),
        (("--models-dir", "no-such-folder"), "--models-dir no-such-folder: no such folder"),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    proc = ldm_serve(*args)
    assert proc.returncode != 0
    error, marker = proc.stderr.splitlines()
    assert error == f"error: {message}" and marker == "no torch"


def test_a_file_that_is_no_checkpoint_and_a_busy_port_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a checkpoint")
    proc = ldm_serve("--model", str(bad), "--port", str(free_port()))
    assert proc.returncode != 0
    error, marker = proc.stderr.splitlines()
    assert error.startswith(f"error: {bad}") and marker == "no torch"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ldm_serve("--port", str(port))
    assert proc.returncode != 0
    assert (
        proc.stderr.splitlines()[0]
        == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_serves_behind_api_auth_and_stops_on_ctrl_c():
    port = free_port()
    command = [sys.executable, "-c", RUNNER, "serve", "--port", str(port), "--api-auth", "u:p"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/sdapi/v1"
        deadline = time.time() + 120
        while True:
            try:
                answer = httpx.get(f"{url}/options", auth=("u", "p"))
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.2)
        assert answer.status_code == 200
        assert answer.json()["sd_model_checkpoint"].startswith("ldm-shapes.safetensors")
        assert httpx.get(f"{url}/options").status_code == 401
        body = {"prompt": "a circle", "steps": 2, "width": 64, "height": 64}
        assert (
            httpx.post(f"{url}/txt2img", json=body, auth=("u", "p"), timeout=60).status_code == 200
        )
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # Ctrl-C, as every ldm command
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr


def test_accelerate_launch_gives_one_server_with_a_worker_per_process(monkeypatch):
    from ldm_cli.cli.serve import launched_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_workers(3) == 3
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_workers(1) == 4
    assert launched_workers(4) == 4
    with pytest.raises(UserError, match="--workers 2 under accelerate launch with 4 processes"):
        launched_workers(2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert launched_workers(1) == 0
