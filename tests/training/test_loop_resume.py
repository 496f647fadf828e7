"""The shared training loop: Ctrl-C saves a resumable state, --resume refuses changed settings,
and a resumed stage's losses cover the whole run. A tiny MLP stands in for the networks."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
import torch
from torch import nn

from ldm_cli.core.errors import UserError
from ldm_cli.core.interrupts import Interrupted
from ldm_cli.training.loop import STATE_DIR, train_stage
from ldm_cli.training.run_settings import SETTINGS_FILE, changed_settings, run_record
from ldm_cli.training.settings import LoopOptions, StageSettings

STEPS = 10
INPUTS = torch.linspace(-1, 1, 24).reshape(12, 2)
TARGETS = INPUTS.sum(1, keepdim=True).sin()
SETTINGS = StageSettings(STEPS, 4, 1e-2, warmup=2)
FINGERPRINT = {"data": "/data/a", "images": 12}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(interrupt_at: int | None = None):
    def loss_fn(model, draws):
        if draws.step == interrupt_at:
            raise KeyboardInterrupt
        indices = draws.batch_indices(len(INPUTS), 4)
        noise = 0.01 * torch.randn(4, 1, generator=draws.local)
        return (model(INPUTS[indices]) - TARGETS[indices] - noise).square().mean()

    return loss_fn


def _run(run_dir, interrupt_at=None, settings=SETTINGS, fingerprint=FINGERPRINT, **options):
    defaults = {"seed": 1, "log_every": 2, "save_every": 0, "quiet": True, "threads": 1}
    options = LoopOptions(run_dir, **{**defaults, **options})
    return train_stage(
        "mlp", _model(), _loss(interrupt_at), settings, options, ema_decay=0.9,
        fingerprint=fingerprint,
    )  # fmt: skip


def _log(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for (key, value), other in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(value, other, rtol=0, atol=0, msg=key)


def test_ctrl_c_saves_the_state_and_resume_matches_an_uninterrupted_run(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    # no --save-every save before step 5: without the Ctrl-C save all of it would be lost
    with pytest.raises(Interrupted) as caught:
        _run(run, interrupt_at=5)
    assert str(caught.value) == "mlp: interrupted at step 5 of 10; state saved: --resume continues"
    assert isinstance(caught.value, KeyboardInterrupt)
    state = run / "mlp" / STATE_DIR
    assert json.loads((state / SETTINGS_FILE).read_text())["lr"] == SETTINGS.lr
    assert [step for step, _ in _log(run)] == [2, 4]

    resumed = _run(run, resume=True)
    reference = _run(straight)
    assert resumed.step == reference.step == STEPS and resumed.finished
    _same_weights(resumed.model, reference.model)
    _same_weights(resumed.ema, reference.ema)
    # the log and the stage's losses are the whole run's, interval for interval
    assert _log(run) == _log(straight)
    assert resumed.losses == reference.losses == [loss for _, loss in _log(straight)]
    assert len(resumed.losses) == STEPS // 2


def test_ctrl_c_before_the_first_step_saves_step_zero(tmp_path):
    with pytest.raises(Interrupted, match="interrupted at step 0 of 10"):
        _run(tmp_path, interrupt_at=0)
    resumed = _run(tmp_path, resume=True)
    _same_weights(resumed.model, _run(tmp_path / "straight").model)


def test_resume_with_changed_settings_is_refused_before_any_step(tmp_path):
    stopped = _run(tmp_path, stop_after=4)
    assert stopped.step == 4 and not stopped.finished
    log = (tmp_path / "train_log.jsonl").read_text()
    changed = StageSettings(STEPS, 8, 2e-2, warmup=2)
    with pytest.raises(UserError) as caught:
        _run(tmp_path, resume=True, settings=changed, fingerprint={**FINGERPRINT, "images": 13})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--resume: this run's mlp stage was started with ")
    for part in ("batch_size 4, not 8", "lr 0.01, not 0.02", "images 12, not 13"):
        assert part in message, message
    assert "steps" not in message and "data" not in message  # unchanged ones are not named
    with pytest.raises(UserError, match=r'seed 1, not 2; data "/data/a", not "/data/b"'):
        _run(tmp_path, resume=True, seed=2, fingerprint={**FINGERPRINT, "data": "/data/b"})
    with pytest.raises(UserError, match=r"size \(not set\), not 32"):
        _run(tmp_path, resume=True, fingerprint={**FINGERPRINT, "size": 32})
    assert (tmp_path / "train_log.jsonl").read_text() == log  # nothing ran

    finished = _run(tmp_path, resume=True)  # the same settings continue
    assert finished.step == STEPS
    assert finished.losses == _run(tmp_path / "straight").losses  # whole-run losses


def test_a_state_cut_short_between_its_renames_is_resumed(tmp_path):
    _run(tmp_path, stop_after=4)
    state = tmp_path / "mlp" / STATE_DIR
    state.rename(state.with_name(state.name + ".tmp"))  # the old state removed, the new not in
    finished = _run(tmp_path, resume=True)
    assert state.is_dir() and not state.with_name(state.name + ".tmp").exists()
    _same_weights(finished.model, _run(tmp_path / "straight").model)


def test_run_records():
    record = run_record(SETTINGS, 3, 1, {"data": PurePosixPath("/data/a"), "sides": (64, 128)})
    assert record["seed"] == 3 and record["processes"] == 1 and record["sides"] == [64, 128]
    assert record["data"] == "/data/a" and record["batch_size"] == 4
    with pytest.raises(ValueError, match="recorded by train_stage itself"):
        run_record(SETTINGS, 3, 1, {"lr": 1.0})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        run_record(SETTINGS, 3, 1, {"model": object()})
    assert changed_settings({"a": 1, "b": None}, {"a": 1, "c": "x"}) == [
        'c (not set), not "x"',
        "b none, not (not set)",
    ]


def test_the_cli_prints_the_interrupt_message_and_exits_130(monkeypatch, capsys):
    """typer turns a KeyboardInterrupt into exit status 130; the message still gets out."""
    import typer

    from ldm_cli.cli.usage import run_app

    def app_raising(error: KeyboardInterrupt) -> typer.Typer:
        app = typer.Typer()

        @app.command()
        def stage() -> None:
            raise error

        return app

    monkeypatch.setattr("sys.argv", ["ldm"])
    message = "unet: interrupted at step 7 of 9; state saved: --resume continues"
    for error, printed in ((Interrupted(message), message), (KeyboardInterrupt(), "interrupted")):
        with pytest.raises(SystemExit) as caught:
            run_app(app_raising(error))
        assert caught.value.code == 130
        assert capsys.readouterr().err == printed + "\n"
