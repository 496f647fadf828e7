"""The CPU peers of `make bench --peers` (stable-diffusion.cpp, OpenVINO), without installing
either: the table on made-up runs, the per-step arithmetic, failures, and the CPU flags."""

from __future__ import annotations

import json

import pytest

from ldm_cli.bench.peer_table import (
    ToolRuns,
    _record,
    cpu_flags,
    cpu_flags_line,
    peer_table,
    per_step_s,
    pixel_lines,
    setup_lines,
)
from ldm_cli.bench.peer_worker import stage_seconds
from ldm_cli.bench.peers import MARKER, Built, PeerFailure, ensure_venv, one_line


def ldm_run(steps, encode, sample, decode, total, rss_mb=2048.0, load=1.0):
    """A run as ldm_cli.bench.worker reports it."""
    return {
        "steps": steps,
        "load_s": load,
        "encode_s": encode,
        "sample_s": sample,
        "decode_s": decode,
        "end_to_end_s": total,
        "peak_rss_mb": rss_mb,
    }


def peer_run(steps, generate, total, decode=None, rss_mb=1024.0, load=2.0):
    """A run as peer_worker.py reports it."""
    return {
        "steps": steps,
        "load_s": load,
        "generate_s": generate,
        "decode_s": decode,
        "end_to_end_s": total,
        "peak_rss_mb": rss_mb,
    }


def test_per_step_is_the_difference_of_two_step_counts():
    # 8 steps: 0.5 + 6.5 + 1.0 = 8 s; 2 steps: 0.5 + 1.5 + 1.0 = 3 s; (8 - 3) / 6
    assert per_step_s(ldm_run(8, 0.5, 6.5, 1.0, 9.0), ldm_run(2, 0.5, 1.5, 1.0, 4.0)) == 5 / 6
    assert per_step_s(peer_run(8, 14.0, 20.0), peer_run(2, 5.0, 11.0)) == 1.5


def test_table_has_ratios_to_ldm_and_a_line_for_a_failed_peer():
    ldm = ToolRuns("ldm", [ldm_run(8, 0.5, 6.5, 1.0, 10.0)], [ldm_run(2, 0.5, 1.5, 1.0, 5.0)])
    sdcpp = ToolRuns("sd.cpp f16", [peer_run(8, 14.0, 20.0)], [peer_run(2, 5.0, 11.0)])
    failed = ToolRuns("sd.cpp q8_0", failure="build: error: cmake | not found")
    lines = peer_table([ldm, sdcpp, failed])
    assert lines[0].startswith("| tool | load (s) | end to end (s) | per step (s) | decode (s)")
    assert lines[2] == "| ldm | 1.00 | 10.00 | 0.833 | 1.00 | 2.00 | - | - |"
    # ldm / sd.cpp: 10 / 20 end to end, (5/6) / 1.5 per step; sd.cpp tells no decode time
    assert lines[3] == "| sd.cpp f16 | 2.00 | 20.00 | 1.500 | n/a | 1.00 | 0.50 | 0.56 |"
    # a | inside the reason would break the markdown row
    assert lines[4] == "| sd.cpp q8_0 | failed: build: error: cmake / not found | | | | | | |"


def test_repeats_give_medians_and_ratio_ranges():
    ldm = ToolRuns(
        "ldm",
        [ldm_run(8, 0, 6, 0, 10.0), ldm_run(8, 0, 12, 0, 20.0)],
        [ldm_run(2, 0, 0, 0, 4.0), ldm_run(2, 0, 0, 0, 8.0)],
    )
    # the machine slowed 2x in the second repeat, for both tools alike
    other = ToolRuns(
        "OpenVINO fp32",
        [peer_run(8, 12.0, 20.0, decode=1.0), peer_run(8, 24.0, 40.0, decode=1.0)],
        [peer_run(2, 0.0, 8.0), peer_run(2, 0.0, 16.0)],
    )
    row = peer_table([ldm, other])[3]
    assert row == "| OpenVINO fp32 | 2.00 | 30.00 | 3.000 | 1.00 | 1.00 | 0.50 | 0.50 |"


def test_without_two_step_counts_per_step_is_not_claimed():
    ldm = ToolRuns("ldm", [ldm_run(2, 0.5, 1.5, 1.0, 5.0)])
    other = ToolRuns("diffusers", [ldm_run(2, 0.5, 1.5, 1.0, 10.0)])
    row = "| diffusers | 1.00 | 10.00 | n/a | 1.00 | 2.00 | 0.50 | n/a |"
    assert peer_table([ldm, other])[3] == row


def test_a_failing_run_ends_that_tool_with_its_reason():
    tool = ToolRuns("sd.cpp f16")

    def fails():
        raise PeerFailure("ValueError: Failed to load model")

    _record(tool, True, lambda: peer_run(8, 1.0, 2.0))
    _record(tool, True, fails)
    _record(tool, False, lambda: peer_run(2, 1.0, 2.0))  # not run after the failure
    assert tool.failure == "ValueError: Failed to load model"
    assert len(tool.long) == 1 and not tool.short


def test_one_line_keeps_the_last_error_line():
    pip = "Building wheel...\nerror: subprocess-exited-with-error\n  note: see above\n"
    assert one_line(pip) == "error: subprocess-exited-with-error"
    assert one_line("first\nlast\n") == "last"
    assert one_line("") == "no output"
    assert len(one_line("RuntimeError: " + "x" * 500)) == 160


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2
processor\t: 1
flags\t\t: fpu
"""


def test_cpu_flags_of_the_first_processor():
    flags = cpu_flags(CPUINFO)
    assert {"avx", "avx2", "fma", "f16c"} <= flags and "avx512f" not in flags
    line = cpu_flags_line(flags)
    assert line.startswith("- CPU flags: avx avx2 fma f16c; absent: avx_vnni avx512f")
    assert line.endswith("amx_int8.")
    assert cpu_flags("no flags here") == set()
    assert cpu_flags_line(set()).startswith("- CPU flags: none of them; absent: avx avx2")


def test_setup_lines_give_build_and_conversion_times():
    built = {
        "sdcpp": Built(1500.0, {"stable-diffusion-cpp-python": "0.4.7"}),
        "sdcpp-q8_0": Built(40.0),
        "openvino": Built(200.0, {"optimum-intel": "2.2.0", "openvino": "2026.4.1"}),
        "openvino-model": Built(300.0),
    }
    lines = setup_lines(built, 2, {"avx2"})
    assert "0.4.7 built from source for this CPU (ggml's native build) in 25.0 min" in lines[0]
    assert "q8_0 GGUF converted once from the fp16 file in 40 s" in lines[0]
    assert "optimum-intel 2.2.0, openvino 2026.4.1, diffusers ?, installed in 3.3 min" in lines[1]
    assert "exported once to OpenVINO IR (fp32) in 5.0 min" in lines[1]
    assert lines[2].startswith("- CPU flags: avx2;")
    # a peer that never built has no line, only the CPU's
    assert len(setup_lines({}, 2, set())) == 1


def test_pixel_line_says_why_sdcpp_is_not_compared():
    (line,) = pixel_lines({"ldm vs diffusers": 2, "ldm vs OpenVINO": None})
    assert line.startswith("- Max pixel difference, same seed: ldm vs diffusers 2/255, ")
    assert "ldm vs OpenVINO n/a." in line and "its own RNG" in line


def test_sdcpp_stage_timings_come_from_its_log():
    log = (
        "[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.31s\n"
        "[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 12.50s\n"
        "[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 3.25s\n"
    )
    stages = stage_seconds(log)
    assert stages["sampling"] == 12.5 and stages["decode_first_stage"] == 3.25
    assert stages["get_learned_condition"] == 0.31


def test_an_installed_environment_is_reused_and_a_failed_one_not_rebuilt(tmp_path):
    venv = tmp_path / "sdcpp-venv"
    venv.mkdir()
    record = {"spec": ["pkg==1"], "install_s": 321.0, "versions": {"pkg": "1"}}
    (venv / MARKER).write_text(json.dumps(record))
    built = ensure_venv(venv, ("pkg==1",), ("pkg",))
    assert (built.seconds, built.versions, built.reused) == (321.0, {"pkg": "1"}, True)

    failed = tmp_path / "openvino-venv"
    failed.mkdir()
    reason = {"spec": ["other==2"], "reason": "ERROR: No matching distribution"}
    (failed / "ldm-bench-peer-failed.json").write_text(json.dumps(reason))
    with pytest.raises(PeerFailure, match="No matching distribution .*remove .* to retry"):
        ensure_venv(failed, ("other==2",), ("other",))


def test_a_size_section_names_its_settings_and_the_per_step_method():
    from ldm_cli.bench.peer_table import size_section

    ldm = ToolRuns("ldm", [ldm_run(8, 0.5, 6.5, 1.0, 10.0)], [ldm_run(2, 0.5, 1.5, 1.0, 5.0)])
    lines = size_section(512, 8, [ldm], {"ldm vs diffusers": 0})
    assert lines[0] == "### 512x512, fp16 SD 1.5 file, 8 Euler steps, CFG 7.5"
    assert "- per step: (generation at 8 steps - at 2) / (8 - 2)" in "\n".join(lines)
