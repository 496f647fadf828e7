"""`make bench --peers`: ldm and diffusers beside the CPU specialists stable-diffusion.cpp (f16
and q8_0) and OpenVINO (fp32), on the same SD 1.5 file, size, steps, Euler and CFG 7.5, each
run in a fresh process, interleaved over the repeats; and the markdown table it writes.

Per step is measured the same way for every tool, from two step counts: (generation at N steps
- generation at 2 steps) / (N - 2), generation being a loaded model to the image (text
encoding, sampling, decode), so fixed costs and first-step warm-up cancel.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ldm_cli.bench.peers import Built, PeerFailure, one_line, prepare, run_tool
from ldm_cli.bench.report import compare, max_pixel_diff, ratio_cell
from ldm_cli.bench.worker import NEGATIVE, PROMPT

SHORT_STEPS = 2
# the vector extensions that decide which kernels each tool can use
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
OURS = ("ldm", "diffusers")  # run by ldm_cli.bench.worker in this project's environment


@dataclass
class ToolRuns:
    """One tool's runs at one size: N steps and 2 steps, one of each per repeat."""

    name: str
    long: list[dict] = field(default_factory=list)
    short: list[dict] = field(default_factory=list)
    failure: str | None = None


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of /proc/cpuinfo's first processor."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags_line(flags: set[str]) -> str:
    have = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "none of them"
    lack = " ".join(flag for flag in CPU_FLAGS if flag not in flags) or "none"
    return f"- CPU flags: {have}; absent: {lack}."


def generation_s(run: dict) -> float:
    """A loaded model to the image: text encoding, sampling and decode."""
    if "generate_s" in run:
        return run["generate_s"]
    return run["encode_s"] + run["sample_s"] + run["decode_s"]


def per_step_s(long: dict, short: dict) -> float:
    return (generation_s(long) - generation_s(short)) / (long["steps"] - short["steps"])


def _cell(text: str) -> str:
    return text.replace("|", "/")


def _per_step_runs(tool: ToolRuns) -> list[dict]:
    pairs = zip(tool.long, tool.short, strict=False)
    return [{"per_step_s": per_step_s(long, short)} for long, short in pairs]


def _median(runs: list[dict], key: str) -> float | None:
    values = [run.get(key) for run in runs]
    if not values or any(value is None for value in values):
        return None
    return statistics.median(values)


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def peer_table(tools: list[ToolRuns]) -> list[str]:
    """The table rows, ldm first: its ratios to each tool are medians of per-repeat ratios
    (ldm / tool: under 1 where ldm is faster)."""
    ours = tools[0]
    ours_ok = not ours.failure and ours.long
    ours_steps = _per_step_runs(ours) if ours_ok else []
    lines = [
        "| tool | load (s) | end to end (s) | per step (s) | decode (s) | peak RSS (GiB) "
        "| ldm / tool, end to end | ldm / tool, per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in tools:
        if tool.failure or not tool.long:
            reason = _cell(tool.failure or "no run")
            lines.append(f"| {tool.name} | failed: {reason} | | | | | | |")
            continue
        steps = _per_step_runs(tool)
        rss = _median(tool.long, "peak_rss_mb")
        cells = [
            _number(_median(tool.long, "load_s")),
            _number(_median(tool.long, "end_to_end_s")),
            _number(_median(steps, "per_step_s"), 3) if steps else "n/a",
            _number(_median(tool.long, "decode_s")),
            _number(None if rss is None else rss / 1024),
        ]
        if tool is ours or not ours_ok:
            ratios = ["-", "-"]
        else:
            total = ratio_cell(compare(ours.long, tool.long, "end_to_end_s"))
            step = "n/a"
            if steps and len(ours_steps) == len(steps):
                step = ratio_cell(compare(ours_steps, steps, "per_step_s"))
            ratios = [total, step]
        lines.append(f"| {tool.name} | " + " | ".join(cells + ratios) + " |")
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def setup_lines(built: dict[str, Built], threads: int, flags: set[str]) -> list[str]:
    """How each peer was built and converted (once, outside every timing), and the CPU."""
    lines = []
    if sdcpp := built.get("sdcpp"):
        version = sdcpp.versions.get("stable-diffusion-cpp-python", "?")
        line = (
            f"- stable-diffusion.cpp: stable-diffusion-cpp-python {version} built from source for "
            f"this CPU (ggml's native build) in {_minutes(sdcpp.seconds)}"
        )
        if q8 := built.get("sdcpp-q8_0"):
            line += f"; the q8_0 GGUF converted once from the fp16 file in {_minutes(q8.seconds)}"
        lines.append(
            line + f". {threads} threads, Euler on sd.cpp's discrete schedule, its own RNG."
        )
    if openvino := built.get("openvino"):
        v = openvino.versions
        line = (
            f"- OpenVINO: optimum-intel {v.get('optimum-intel', '?')}, openvino "
            f"{v.get('openvino', '?')}, diffusers {v.get('diffusers', '?')}, installed in "
            f"{_minutes(openvino.seconds)}"
        )
        if model := built.get("openvino-model"):
            took = _minutes(model.seconds)
            line += f"; the SD 1.5 file exported once to OpenVINO IR (fp32) in {took}"
        lines.append(
            line + f". f32 inference, static shapes (compiled at load), {threads} threads, "
            "diffusers' EulerDiscreteScheduler."
        )
    return [*lines, cpu_flags_line(flags)]


def pixel_lines(diffs: dict[str, int | None]) -> list[str]:
    same = ", ".join(f"{pair} {'n/a' if d is None else f'{d}/255'}" for pair, d in diffs.items())
    return [
        f"- Max pixel difference, same seed: {same}. sd.cpp draws its noise with its own RNG, "
        "so its images differ by design and are not compared."
    ]


def _diff(pngs: dict[str, Path], a: str, b: str) -> int | None:
    if not (pngs[a].exists() and pngs[b].exists()):
        return None
    return max_pixel_diff(pngs[a], pngs[b])


def peer_comparison(
    cache: Path,
    model: Path,
    config: Path,
    sizes: list[int],
    steps: int,
    repeats: int,
    ours: Callable[[str, int, int, Path], dict],
    order: Callable[[list[str], int], list[str]],
    threads: int,
) -> list[str]:
    """Build what is missing, then run every tool at every size, N and 2 steps per repeat;
    `ours(tool, size, steps, png)` runs ldm or diffusers, `order` rotates the tools."""
    peers = prepare(cache, model, config)
    by_name = {tool.name: tool for tool in peers.tools}

    def run(name: str, size: int, count: int, png: Path) -> dict:
        if name in OURS:
            return ours(name, size, count, png)
        return run_tool(by_name[name], PROMPT, NEGATIVE, size, count, png, threads)

    names = [*OURS, *by_name]
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.exists() else set()
    lines = ["## CPU peers: stable-diffusion.cpp and OpenVINO", ""]
    lines += [*setup_lines(peers.built, threads, flags), ""]
    print("\n".join(lines), flush=True)
    for size in sizes:
        runs = {name: ToolRuns(name) for name in names}
        for tool in peers.tools:
            runs[tool.name].failure = tool.failure
        with tempfile.TemporaryDirectory() as tmp:
            pngs = {name: Path(tmp) / f"{name.replace(' ', '-')}.png" for name in names}
            for repeat in range(max(1, repeats)):
                for count in [steps] + ([SHORT_STEPS] if steps > SHORT_STEPS else []):
                    for name in order(names, repeat):
                        png = pngs[name] if count == steps else Path(tmp) / "short.png"
                        _record(runs[name], count == steps, partial(run, name, size, count, png))
            diffs = {
                "ldm vs diffusers": _diff(pngs, "ldm", "diffusers"),
                "ldm vs OpenVINO": _diff(pngs, "ldm", "OpenVINO fp32"),
                "diffusers vs OpenVINO": _diff(pngs, "diffusers", "OpenVINO fp32"),
            }
        section = size_section(size, steps, list(runs.values()), diffs)
        print("\n".join(section), flush=True)
        lines += section
    return lines


def _record(tool: ToolRuns, long: bool, measure: Callable[[], dict]) -> None:
    """One run into `tool`; its first failure ends the tool's runs (and becomes its row)."""
    if tool.failure:
        return
    try:
        result = measure()
    except (PeerFailure, SystemExit) as failure:
        tool.failure = one_line(str(failure))
        return
    (tool.long if long else tool.short).append(result)


def size_section(size: int, steps: int, tools: list[ToolRuns], diffs: dict) -> list[str]:
    title = f"### {size}x{size}, fp16 SD 1.5 file, {steps} Euler steps, CFG 7.5"
    return [
        title,
        "",
        *peer_table(tools),
        "",
        f"- per step: (generation at {steps} steps - at {SHORT_STEPS}) / "
        f"({steps} - {SHORT_STEPS}), generation being a loaded model to the image; "
        "end to end: process start to PNG, load included.",
        *pixel_lines(diffs),
        "",
    ]
