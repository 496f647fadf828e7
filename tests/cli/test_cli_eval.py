"""`ldm eval` from the command line: its two prompt mixes, the training scenes it leaves out,
its JSON report, its errors."""

from __future__ import annotations

import json

from tests.cli_helpers import ldm, one_thread_per_command  # noqa: F401


def test_eval_writes_both_mixes_and_reports_them(tmp_path):
    reports = {}
    for mix, train_num in (("grammar", "20000"), ("half", "0")):
        out = tmp_path / f"{mix}.json"
        args = ("--num", "4", "--steps", "2", "--mix", mix, "--train-num", train_num)
        proc = ldm("eval", *args, "--json", str(out))
        assert f"({mix} mix)" in proc.stdout.replace("\n", " ")
        reports[mix] = json.loads(out.read_text())
    assert reports["grammar"]["settings"]["mix"] == "grammar"
    # the embedded model's training scenes (ldm dataset shapes --seed 0 --num 20000), unique
    assert reports["grammar"]["settings"]["excluded_training_scenes"] == 13225
    assert reports["half"]["settings"]["excluded_training_scenes"] == 0
    half = reports["half"]
    assert half["settings"]["mix"] == "half"
    assert [r["heldout"] for r in half["results"]] == [False, False, True, True]
    for report in reports.values():
        assert report["all"]["images"] == 4
        assert 0.0 <= report["all"]["background"] <= 1.0


def test_an_unknown_mix_is_a_one_line_error(tmp_path):
    out = tmp_path / "eval.json"
    proc = ldm("eval", "--num", "2", "--mix", "most", "--json", str(out), check=False)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "error: unknown --mix 'most'; choose one of half, grammar"
    ]
