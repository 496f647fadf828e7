"""The CPU specialists `make bench --peers` puts beside ldm: stable-diffusion.cpp and OpenVINO.

Each comes from PyPI into a virtual environment of its own under bench-cache/peers/ and runs
in peer_worker.py with that environment's python, so neither shares a package with ldm. Every
step is done once: a marker in each environment records the versions and how long the install
took, and a record beside each converted model how long the conversion took; a later bench
reuses them. A peer that fails to build, convert or run becomes a `PeerFailure`, whose text is
the one line the table shows, never a crash of the bench.

`python -m ldm_cli.bench.peers` builds (or checks) both peers and converts the models, without
benchmarking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SDCPP_SPEC = ("stable-diffusion-cpp-python==0.4.7",)
# torch from the 2.14.1 wheel ldm uses; diffusers unpinned, so that pip picks one whose
# huggingface-hub optimum-intel accepts
OPENVINO_SPEC = ("torch==2.14.1", "optimum-intel[openvino]==2.2.0", "diffusers")
SDCPP_DISTS = ("stable-diffusion-cpp-python",)
OPENVINO_DISTS = ("optimum-intel", "openvino", "diffusers", "huggingface-hub", "torch")
MARKER = "ldm-bench-peer.json"
FAILED = "ldm-bench-peer-failed.json"
WORKER = Path(__file__).with_name("peer_worker.py")
# the q8_0 file is converted once from the f16 one; f16 runs the SD 1.5 file as it is
SDCPP_Q8_FILE = "sd15-q8_0.gguf"
OPENVINO_DIR = "openvino-sd15-fp32"
# one generation; past this a peer is taken as hung (and its row says so)
RUN_TIMEOUT_S = 3600


class PeerFailure(Exception):
    """A peer that could not be built, converted or run; str() is the table's one-line reason."""


@dataclass
class Built:
    """An environment or converted model, and the seconds it took to make (once)."""

    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    reused: bool = False


@dataclass
class PeerTool:
    """One row of the table: the peer's python and worker arguments, or why it cannot run."""

    name: str
    python: Path | None = None
    worker_args: list[str] = field(default_factory=list)
    model: Path | None = None
    failure: str | None = None


@dataclass
class Peers:
    tools: list[PeerTool]
    # "sdcpp", "sdcpp-q8_0", "openvino", "openvino-model": what was built and how long it took
    built: dict[str, Built]


def one_line(text: str, limit: int = 160) -> str:
    """The line of a failed command's output that says most about why: its last error line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _logged(cmd: list, log: Path, env: dict | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-20000:]
        raise PeerFailure(f"{one_line(tail)} (log: {log})")


def installed_versions(python: Path, dists: tuple[str, ...]) -> dict[str, str]:
    script = (
        "import json, sys, importlib.metadata as m\n"
        "def v(d):\n"
        "    try:\n"
        "        return m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({d: v(d) for d in sys.argv[1:]}))"
    )
    proc = subprocess.run([str(python), "-c", script, *dists], capture_output=True, text=True)
    found = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return {name: version for name, version in found.items() if version}


def ensure_venv(venv: Path, spec: tuple[str, ...], dists: tuple[str, ...], env=None) -> Built:
    """The environment at `venv` with `spec` installed: reused when its marker names the same
    spec, else made anew. A failed install is recorded too, so that a later bench does not
    spend the build again (remove the folder to retry)."""
    marker, failed = venv / MARKER, venv / FAILED
    if marker.exists() and json.loads(marker.read_text())["spec"] == list(spec):
        record = json.loads(marker.read_text())
        return Built(record["install_s"], record["versions"], reused=True)
    if failed.exists() and json.loads(failed.read_text())["spec"] == list(spec):
        reason = json.loads(failed.read_text())["reason"]
        raise PeerFailure(f"{reason} (remove {venv} to retry)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    log.write_text("")
    python = venv / "bin" / "python"
    print(f"installing {' '.join(spec)} into {venv} (log: {log})...", flush=True)
    start = time.perf_counter()
    try:
        _logged([sys.executable, "-m", "venv", venv], log)
        _logged([python, "-m", "pip", "install", "--upgrade", "pip"], log)
        _logged([python, "-m", "pip", "install", *spec], log, dict(os.environ, **(env or {})))
    except PeerFailure as failure:
        venv.mkdir(parents=True, exist_ok=True)
        failed.write_text(json.dumps({"spec": list(spec), "reason": str(failure)}))
        raise
    seconds = time.perf_counter() - start
    versions = installed_versions(python, dists)
    record = {"spec": list(spec), "install_s": seconds, "versions": versions, "env": env or {}}
    marker.write_text(json.dumps({**record, "built": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    print(f"installed in {seconds / 60:.1f} min: {versions}", flush=True)
    return Built(seconds, versions)


def read_through(path: Path) -> None:
    """Read a model (a file, or every file of a folder) once, so no tool pays for the disk."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def run_worker(python: Path, args: list[str], timeout: float | None = None) -> dict:
    """peer_worker.py under the peer's python; its last JSON line, or a PeerFailure."""
    env = dict(os.environ, LDM_BENCH_T0=repr(time.time()), HF_HUB_OFFLINE="1")
    env.update(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the peer sees its own environment only
    cmd = [str(python), str(WORKER), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerFailure(f"timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise PeerFailure(one_line(proc.stderr or proc.stdout))
    # C libraries may print after us (their stdio buffers flush at exit): look for the JSON line
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise PeerFailure("the worker printed no JSON line")


def converted(out: Path, source: Path, python: Path, args: list) -> Built:
    """`out` made from `source` by a peer_worker conversion, once per source file: the record
    beside it keeps the conversion's seconds."""
    record_path = out.with_name(out.name + ".json")
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime": stat.st_mtime}
    stamp["args"] = list(map(str, args))
    if out.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record["stamp"] == stamp:
            return Built(record["seconds"], reused=True)
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    print(f"converting {source.name} -> {out} ...", flush=True)
    start = time.perf_counter()
    run_worker(python, args)
    seconds = time.perf_counter() - start
    if not out.exists():
        raise PeerFailure(f"the conversion wrote no {out.name}")
    record_path.write_text(json.dumps({"stamp": stamp, "seconds": seconds}, indent=1))
    print(f"converted in {seconds:.0f} s", flush=True)
    return Built(seconds)


def _sdcpp(root: Path, model: Path, built: dict[str, Built]) -> list[PeerTool]:
    names = ("sd.cpp f16", "sd.cpp q8_0")
    # ggml's CMake builds for this CPU (GGML_NATIVE); 2 jobs keep a shared machine usable
    build_env = {"CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")}
    try:
        built["sdcpp"] = ensure_venv(root / "sdcpp-venv", SDCPP_SPEC, SDCPP_DISTS, build_env)
    except PeerFailure as failure:
        return [PeerTool(name, failure=f"build: {failure}") for name in names]
    python = root / "sdcpp-venv" / "bin" / "python"
    tools = [PeerTool(names[0], python, ["sdcpp", "--wtype", "f16"], model)]
    gguf = root / SDCPP_Q8_FILE
    try:
        args = ["sdcpp-convert", "--model", model, "--out", gguf, "--wtype", "q8_0"]
        built["sdcpp-q8_0"] = converted(gguf, model, python, args)
    except PeerFailure as failure:
        return [*tools, PeerTool(names[1], failure=f"conversion: {failure}")]
    # the GGUF holds its types: q8_0 where sd.cpp quantises, f16/f32 where it does not
    return [*tools, PeerTool(names[1], python, ["sdcpp", "--wtype", "default"], gguf)]


def _openvino(root: Path, model: Path, config: Path, built: dict[str, Built]) -> list[PeerTool]:
    name = "OpenVINO fp32"
    try:
        built["openvino"] = ensure_venv(root / "openvino-venv", OPENVINO_SPEC, OPENVINO_DISTS)
    except PeerFailure as failure:
        return [PeerTool(name, failure=f"install: {failure}")]
    python = root / "openvino-venv" / "bin" / "python"
    out = root / OPENVINO_DIR
    try:
        args = ["openvino-convert", "--model", model, "--config", config, "--out", out]
        built["openvino-model"] = converted(out, model, python, args)
    except PeerFailure as failure:
        return [PeerTool(name, failure=f"conversion: {failure}")]
    return [PeerTool(name, python, ["openvino"], out)]


def prepare(cache: Path, model: Path, config: Path) -> Peers:
    """Every peer tool ready to run (building and converting what is missing), or failed."""
    # absolute paths: optimum-intel takes a relative folder for a model id on the Hub
    root, model, config = (cache / "peers").resolve(), model.resolve(), config.resolve()
    root.mkdir(parents=True, exist_ok=True)
    built: dict[str, Built] = {}
    tools = _sdcpp(root, model, built) + _openvino(root, model, config, built)
    return Peers(tools, built)


def run_tool(
    tool: PeerTool, prompt: str, negative: str, size: int, steps: int, png: Path, threads: int
) -> dict:
    """One generation by a peer in a fresh process: the worker's JSON (raises PeerFailure)."""
    if tool.failure:
        raise PeerFailure(tool.failure)
    read_through(tool.model)
    args = [*tool.worker_args, "--model", tool.model, "--prompt", prompt, "--negative", negative]
    args += ["--size", size, "--steps", steps, "--png", png, "--threads", threads]
    return run_worker(tool.python, args, timeout=RUN_TIMEOUT_S)


def main() -> None:
    from ldm_cli.bench.__main__ import ROOT, checkpoint, diffusers_config

    cache = ROOT / "bench-cache"
    peers = prepare(cache, checkpoint(cache), diffusers_config(cache))
    for tool in peers.tools:
        print(f"{tool.name}: {'failed: ' + tool.failure if tool.failure else 'ready'}")
    for what, built in peers.built.items():
        print(f"{what}: {built.seconds:.0f} s{' (earlier)' if built.reused else ''}")


if __name__ == "__main__":
    main()
