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


def test_concept_eval_prints_one_line_and_writes_its_report(tmp_path):
    out = tmp_path / "concept.json"
    args = ("--concept", "zorp", "--num", "2", "--steps", "2", "--json", str(out))
    proc = ldm("eval", *args)
    summary = proc.stdout.splitlines()[0]
    assert summary.startswith("ldm eval --concept zorp: ") and "/2 = " in summary
    assert "ldm-shapes, no adapter, 2 steps" in summary
    report = json.loads(out.read_text())
    assert report["settings"]["word"] == "zorp" and len(report["cases"]) == 2
    assert all(" zorp " in case["prompt"] for case in report["cases"])


def test_concept_eval_refuses_a_grammar_word_and_control(tmp_path):
    proc = ldm("eval", "--concept", "square", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --concept: the concept word 'square' is a word of the shapes grammar"
    ]
    proc = ldm("eval", "--concept", "zorp", "--control", str(tmp_path / "c.pt"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_concept_eval_uses_the_embeddings_it_is_given(tmp_path):
    """An embedding named zorp holding the word "square"'s vector: the model draws squares, which
    the judge sees as squares, not as the concept."""
    from safetensors.torch import save_file

    from ldm_cli.pipeline.load import load
    from ldm_cli.text.tokenizer import get_tokenizer

    text_model = load(None, device="cpu").model.text_encoder.transformer.text_model
    (square,) = get_tokenizer().encode_ids("square")
    vector = text_model.embeddings.token_embedding.weight[square : square + 1].detach().clone()
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": vector}, str(tmp_path / "emb" / "zorp.safetensors"))
    out = tmp_path / "concept.json"
    args = ("--concept", "zorp", "--num", "4", "--steps", "10", "--json", str(out))
    proc = ldm("eval", *args, "--embeddings", str(tmp_path / "emb"))
    assert f"ldm-shapes + {tmp_path / 'emb'}, 10 steps" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["embeddings"] == str(tmp_path / "emb")
    cases = report["cases"]
    assert sum(c["found_shape"] == "square" for c in cases) >= 2, cases
    assert not any(c["ok"] for c in cases)


def test_the_concept_help_names_the_threshold():
    import inspect

    from ldm_cli.cli.eval import eval_command
    from ldm_cli.evaluation.concept_eval import IOU_PASS

    option = inspect.signature(eval_command).parameters["concept"].default
    assert f"IoU >= {IOU_PASS}." in option.help
