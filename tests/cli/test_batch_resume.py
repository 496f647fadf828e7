"""Fixed output numbers and `ldm generate --resume`: an interrupted batch, resumed, gives
exactly the files of an uninterrupted run, and no reader ever sees a partial PNG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_cli.cli.batch_resume import (
    Planned,
    base_number,
    clean_leftovers,
    find_finished,
    save_png_numbered,
)
from ldm_cli.cli.outputs import reservation_owner, reserve
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.pngmeta import read_parameters
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=2)


def pngs(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def assert_same_files(a: Path, b: Path) -> None:
    """The same names, pixels and parameters text in both folders, and nothing else."""
    assert pngs(a) == pngs(b)
    assert sorted(os.listdir(a)) == pngs(a), "left-over files in the resumed folder"
    for name in pngs(a):
        assert np.array_equal(pixels(a / name), pixels(b / name)), name
        assert read_parameters(a / name) == read_parameters(b / name), name


def _complete_png(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except FileNotFoundError:
        return True  # gone between listing and opening: nothing partial was seen
    except Exception:
        return False


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = [
        "generate",
        "a red circle",
        "--steps",
        "6",
        "--seed",
        "20",
        "-N",
        "6",
        "-b",
        "2",
        "--model",
        str(tiny),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_cli.cli", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 600
    try:
        while True:  # every name a reader can see is a whole PNG
            names = pngs(killed) if killed.is_dir() else []
            assert all(_complete_png(killed / n) for n in names), names
            if names:
                break
            assert proc.poll() is None, "the run ended before its first image appeared"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = pngs(killed)
    assert 1 <= len(before) < 6, f"the kill came too late to test anything: {before}"
    assert all(_complete_png(killed / n) for n in before)
    kept = {n: (killed / n).stat().st_ino for n in before}

    resumed = ldm(*args, "--out", str(killed), "--resume")
    assert f"resume: {len(before)} of 6 images" in resumed.stderr
    assert len(written(resumed)) == 6 - len(before)
    ldm(*args, "--out", str(whole))
    assert len(pngs(whole)) == 6
    assert_same_files(killed, whole)
    assert {n: (killed / n).stat().st_ino for n in before} == kept  # finished files untouched


def test_ctrl_c_keeps_finished_images_and_leaves_nothing_partial(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "a cat", "--steps", "6", "--seed", "3", "-N", "8", "--model", str(tiny)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_cli.cli", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a test run started in the background (nohup, `&`) ignores SIGINT, and so would ldm
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600
    try:
        while not (out.is_dir() and pngs(out)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted", stderr
    kept = pngs(out)
    assert 1 <= len(kept) < 8
    assert sorted(os.listdir(out)) == kept  # no temporary file or reservation left behind
    assert [Path(line).name for line in stdout.splitlines()] == kept
    assert all(_complete_png(out / name) for name in kept)


def test_resume_renders_the_missing_image_of_a_batch(tiny, tmp_path):
    """An image missing from the middle of a batch is rendered with its whole batch (so its
    pixels are those of the batched run) and written under its own number."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a blue square\n"
        '--prompt "a cat" --negative_prompt "blurry" --seed 77 --batch_size 2 --n_iter 2\n'
        "a green star\n"
    )
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ["generate", "--prompts-file", str(prompts), "--steps", "2", "--seed", "5"]
    args += ["--model", str(tiny)]
    first = written(ldm(*args, "--out", str(whole)))
    assert [p.name[:5] for p in first] == ["00001", "00002", "00003", "00004", "00005", "00006"]
    ldm(*args, "--out", str(out))
    for name in (first[2].name, first[5].name):  # the 2nd of a batch, and the last image
        (out / name).unlink()
    resumed = ldm(*args, "--out", str(out), "--resume")
    assert [p.name for p in written(resumed)] == [first[2].name, first[5].name]
    assert_same_files(out, whole)
    again = ldm(*args, "--out", str(out), "--resume")
    assert written(again) == [] and "rendering 0" in again.stderr


def test_numbers_continue_after_other_files_and_resume_finds_its_own(tiny, tmp_path):
    out = tmp_path / "out"
    ldm(
        "generate",
        "a dog",
        "--steps",
        "2",
        "--seed",
        "1",
        "-N",
        "2",
        "--model",
        str(tiny),
        "-o",
        str(out),
    )
    args = ["generate", "a cat", "--steps", "2", "--seed", "9", "-N", "3", "--model", str(tiny)]
    ours = written(ldm(*args, "-o", str(out)))
    assert [p.name for p in ours] == [
        "00003-9-a-cat.png",
        "00004-10-a-cat.png",
        "00005-11-a-cat.png",
    ]
    ours[0].unlink()
    # someone else's image lands meanwhile; the resumed image keeps its own number
    ldm("generate", "a dog", "--steps", "2", "--seed", "3", "--model", str(tiny), "-o", str(out))
    resumed = written(ldm(*args, "-o", str(out), "--resume"))
    assert [p.name for p in resumed] == ["00003-9-a-cat.png"]
    assert pngs(out) == [
        "00001-1-a-dog.png",
        "00002-2-a-dog.png",
        "00003-9-a-cat.png",
        "00004-10-a-cat.png",
        "00005-11-a-cat.png",
        "00006-3-a-dog.png",
    ]


def test_a_different_command_does_not_match(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "a cat", "--seed", "4", "--model", str(tiny), "-o", str(out)]
    ldm(*args, "--steps", "2")
    resumed = ldm(*args, "--steps", "3", "--resume")  # other steps: another image
    assert "resume: 0 of 1" in resumed.stderr
    assert len(pngs(out)) == 2


# -- the pieces, in process --------------------------------------------------------------


def _planned(n: int, seed: int = 100, prompt: str = "a cat") -> list[Planned]:
    return [
        Planned(k, k, Request(prompt=prompt, seed=seed + k), f"{prompt}\nSeed: {seed + k}")
        for k in range(n)
    ]


def _save(out: Path, p: Planned, number: int) -> Path:
    image = Image.new("RGB", (8, 8), (p.index, 0, 0))
    return save_png_numbered(image, out, number, p.request.seed, p.request.prompt, p.parameters)


def test_find_finished_matches_by_parameters(tmp_path):
    planned = _planned(4)
    _save(tmp_path, planned[1], 8)
    _save(tmp_path, planned[3], 10)
    # the same name pattern but other parameters (another run): not a match
    other = Planned(0, 0, Request(prompt="a cat", seed=100), "a cat\nSteps: 99, Seed: 100")
    _save(tmp_path, other, 3)
    (tmp_path / "00004-102-a-cat.png").write_bytes(b"not a png")  # junk: not a match
    finished = find_finished(tmp_path, planned)
    assert finished == {1: 8, 3: 10}
    assert base_number(tmp_path, finished) == 7
    assert base_number(tmp_path, {}) == 11
    assert base_number(tmp_path / "new", {}) == 1


def test_duplicate_images_each_need_their_own_file(tmp_path):
    """Two identical lines of a prompts file are two images: one file covers one of them."""
    p = _planned(1)[0]
    planned = [p, Planned(1, 1, p.request, p.parameters)]
    _save(tmp_path, p, 1)
    assert find_finished(tmp_path, planned) == {0: 1}


def test_a_taken_number_is_never_overwritten(tmp_path):
    p = _planned(1)[0]
    first = _save(tmp_path, p, 5)
    assert first.name == "00005-100-a-cat.png"
    content = first.read_bytes()
    second = _save(tmp_path, p, 5)
    assert second.name == "00006-100-a-cat.png"
    assert first.read_bytes() == content
    (tmp_path / ".00007.reserved").write_bytes(b"")  # another writer is publishing 7
    assert _save(tmp_path, p, 7).name == "00008-100-a-cat.png"


def test_clean_leftovers_of_dead_processes(tmp_path):
    planned = _planned(2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".100-a-cat.tmp-{dead.pid}-0123abcd"
    alive = tmp_path / f".101-a-cat.tmp-{os.getpid()}-0123abcd"
    foreign = tmp_path / f".999-a-dog.tmp-{dead.pid}-0123abcd"
    old_reservation = tmp_path / ".00003.reserved"
    new_reservation = tmp_path / ".00004.reserved"
    for path in (stale, alive, foreign, old_reservation, new_reservation):
        path.write_bytes(b"partial")
    os.utime(old_reservation, (time.time() - 60, time.time() - 60))
    removed = clean_leftovers(tmp_path, planned, base=3)
    assert sorted(removed) == sorted([stale.name, old_reservation.name])
    assert alive.exists() and foreign.exists() and new_reservation.exists()
    # a fresh reservation names its process: a killed one's goes at once, a live one's stays
    new_reservation.write_bytes(str(dead.pid).encode())
    live_reservation = tmp_path / ".00003.reserved"
    assert reserve(live_reservation) and reservation_owner(live_reservation) == os.getpid()
    assert clean_leftovers(tmp_path, planned, base=3) == [new_reservation.name]
    assert live_reservation.exists() and not reserve(live_reservation)


def test_an_interrupt_while_publishing_waits_for_the_path_to_be_printed(capsys):
    from ldm_cli.core.interrupts import interrupt_after

    # SIGINT as a terminal's foreground run has it (a run started in the background ignores it)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            print("published", flush=True)  # still runs: the interrupt waits for the block
        assert capsys.readouterr().out == "published\n"
        with interrupt_after():
            pass  # nothing arrived: no interrupt, and the default handler is back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupt_after():  # an ignored SIGINT stays ignored
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
