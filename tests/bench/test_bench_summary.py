"""How `make bench` interleaves repeated runs and summarises them."""

from __future__ import annotations

import math

from ldm_cli.bench.__main__ import run_order
from ldm_cli.bench.report import compare, ratio_cell


def test_each_repeat_starts_with_another_tool():
    tools = ["ldm", "diffusers", "ldm-winograd"]
    orders = [run_order(tools, r) for r in range(3)]
    assert [o[0] for o in orders] == tools
    assert all(sorted(o) == sorted(tools) for o in orders)


def test_ratio_is_the_median_of_paired_ratios():
    # the machine slows down 2x between repeats; paired ratios stay 0.8
    ours = [{"t": 8.0}, {"t": 16.0}, {"t": 8.8}]
    ref = [{"t": 10.0}, {"t": 20.0}, {"t": 10.0}]
    c = compare(ours, ref, "t")
    assert (c["a"], c["b"]) == (8.8, 10.0)
    assert c["ratio"] == 0.8 and c["low"] == 0.8 and math.isclose(c["high"], 0.88)
    assert ratio_cell(c) == "0.80 (0.80-0.88)"
    assert ratio_cell(compare(ours[:1], ref[:1], "t")) == "0.80"


def test_compiled_variants_are_tabled_against_eager():
    from ldm_cli.bench.report import compiled_lines

    def run(step, decode, total):
        return {"unet_step_s": step, "decode_s": decode, "end_to_end_s": total}

    eager = [run(0.10, 0.5, 9.0), run(0.12, 0.5, 9.5)]
    graphs = [run(0.05, 0.5, 30.0), run(0.06, 0.5, 31.0)]
    lines = compiled_lines({"ldm-cuda-graphs": graphs}, eager, {"ldm-cuda-graphs": 1})
    assert lines[2] == "| metric | ldm-cuda-graphs | eager |"
    assert lines[4] == "| U-Net per step (s) | 0.055 (0.50) | 0.110 |"
    assert lines[6].startswith("| end to end (s) | 30.500 (3.")  # compilation counts here
    assert lines[-2] == "Max pixel difference from eager: ldm-cuda-graphs 1/255."


def test_size_table_shows_ratios_and_achieved_gflops():
    from ldm_cli.bench.report import METRICS, size_table

    cpu_metrics = [key for key, _ in METRICS if key != "peak_gpu_mb"]

    def run(scale):
        return {key: scale * (i + 1) for i, key in enumerate(cpu_metrics)}

    lines = size_table("## 256x256, fp32 file", [run(1.0)], [run(2.0)], (800.0, 600.0), 170.0, 1)
    assert lines[:4] == [
        "## 256x256, fp32 file",
        "",
        "| metric | ldm | diffusers | ldm / diffusers |",
        "|---|---|---|---|",
    ]
    assert lines[4] == "| load (s) | 1.00 | 2.00 | 0.50 |"
    # the U-Net step took 3 s (ours) and 6 s: 800 GFLOP over each
    assert "| peak RSS (MiB) | 6.00 | 12.00 | 0.50 |" in lines
    assert not any("GPU" in line for line in lines)  # measured on CUDA only
    gflops = "| U-Net step GFLOP/s (800 GFLOP) | 267 | 133 | peak 170 |"
    assert lines[4 + len(cpu_metrics)] == gflops
    assert lines[-2] == "Same image: max pixel difference 1/255."
