import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
from PIL import Image

from ldm_cli.cli import outputs
from ldm_cli.cli.outputs import next_counter, output_name, save_png_atomic, slugify
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import read_parameters


def tiny_image(value=0):
    return Image.new("RGB", (4, 4), (value, 0, 0))


def save(out_dir, seed=42, prompt="a cat", parameters="a cat\nSteps: 1"):
    return save_png_atomic(tiny_image(), out_dir, seed, prompt, parameters)


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("A Cat, sitting on a MAT!", "a-cat-sitting-on-a-mat"),
        ("  --(masterpiece:1.2)--  ", "masterpiece-1-2"),
        ("Café crème", "cafe-creme"),
        ("", "image"),
        ("!!! ???", "image"),
        ("猫", "image"),
        ("word " * 20, ("word-" * 10)[:48].rstrip("-")),
        ("a" * 47 + " b", "a" * 47),  # cut at 48 leaves a dash, which goes
        ("ink sketch <lora:inkstyle:0.8>, shiny", "ink-sketch-shiny"),
    ],
)
def test_slugify(prompt, slug):
    assert slugify(prompt) == slug
    assert len(slug) <= 48


def test_output_name():
    assert output_name(7, 42, "A cat") == "00007-42-a-cat.png"
    assert output_name(123456, 1, "") == "123456-1-image.png"


def test_first_file_is_00001_and_metadata_reads_back(tmp_path):
    path = save(tmp_path / "new" / "dir", parameters="un café\nSteps: 3")
    assert path == tmp_path / "new" / "dir" / "00001-42-a-cat.png"
    assert read_parameters(path) == "un café\nSteps: 3"
    assert Image.open(path).size == (4, 4)


def test_counter_continues_after_the_highest_existing_one(tmp_path):
    for name in ["00003-1-x.png", "00007-9-y.png", "0042-z.png", "notes.txt", "12345.png"]:
        (tmp_path / name).write_bytes(b"")
    assert next_counter(tmp_path) == 8
    assert save(tmp_path).name == "00008-42-a-cat.png"
    assert save(tmp_path, seed=43, prompt="a dog").name == "00009-43-a-dog.png"


def test_counter_goes_past_99999(tmp_path):
    (tmp_path / "99999-1-x.png").write_bytes(b"")
    assert save(tmp_path).name == "100000-42-a-cat.png"
    assert save(tmp_path).name == "100001-42-a-cat.png"


def test_no_temporary_or_reservation_files_are_left(tmp_path):
    for _ in range(3):
        save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "00001-42-a-cat.png",
        "00002-42-a-cat.png",
        "00003-42-a-cat.png",
    ]


def test_a_full_disk_leaves_no_reservation(tmp_path, monkeypatch):
    real_write = os.write

    def full(descriptor, data):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(".reserved"):
            raise OSError(28, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(outputs.os, "write", full)
    with pytest.raises(UserError, match="No space left on device"):
        save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_name_that_appears_meanwhile_is_not_overwritten(tmp_path, monkeypatch):
    existing = tmp_path / "00001-42-a-cat.png"
    existing.write_bytes(b"keep me")
    # as if another writer published 00001 right after this one looked
    monkeypatch.setattr(outputs, "_final_counters", lambda names: set())
    path = save(tmp_path)
    assert path.name == "00002-42-a-cat.png"
    assert existing.read_bytes() == b"keep me"


def test_counter_used_by_a_finished_writer_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "00001-7-a-dog.png").write_bytes(b"keep me")
    monkeypatch.setattr(outputs, "next_counter", lambda out_dir: 1)  # a stale look at the folder
    assert save(tmp_path).name == "00002-42-a-cat.png"


def test_without_hard_links_nothing_is_overwritten_either(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(outputs, "_final_counters", lambda names: set())
    existing = tmp_path / "00001-42-a-cat.png"
    existing.write_bytes(b"keep me")
    path = save(tmp_path, parameters="x\nSteps: 2")
    assert path.name == "00002-42-a-cat.png"
    assert existing.read_bytes() == b"keep me"
    assert read_parameters(path) == "x\nSteps: 2"
    assert sorted(os.listdir(tmp_path)) == ["00001-42-a-cat.png", "00002-42-a-cat.png"]


def test_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(UserError, match=f"cannot create output directory {blocker}"):
        save(blocker)
    with pytest.raises(UserError, match="cannot create output directory .*file/sub"):
        save(blocker / "sub")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match=f"output directory {locked} is not writable"):
            save(locked)
    finally:
        locked.chmod(0o700)


def check_distinct_complete_files(out_dir, count):
    names = sorted(os.listdir(out_dir))
    assert len(names) == count
    assert sorted(int(name.split("-")[0]) for name in names) == list(range(1, count + 1))
    for name in names:
        seed = name.split("-")[1]
        assert read_parameters(out_dir / name) == f"a cat\nSeed: {seed}"


def test_concurrent_threads_write_distinct_files(tmp_path):
    errors = []

    def worker(first_seed):
        try:
            for seed in range(first_seed, first_seed + 5):
                save(tmp_path, seed=seed, parameters=f"a cat\nSeed: {seed}")
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(100 * i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    check_distinct_complete_files(tmp_path, 20)


def save_in_other_process(out_dir, first_seed):
    for seed in range(first_seed, first_seed + 4):
        save(out_dir, seed=seed, parameters=f"a cat\nSeed: {seed}")


def test_concurrent_processes_write_distinct_files(tmp_path):
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    processes = [
        context.Process(target=save_in_other_process, args=(tmp_path, 100 * i)) for i in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    check_distinct_complete_files(tmp_path, 12)


def test_metadata_modules_do_not_import_torch():
    code = (
        "import sys, ldm_cli.cli.outputs, ldm_cli.text.prompts_file, ldm_cli.core.pngmeta\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_written_paths_are_printed_in_one_write(monkeypatch, tmp_path):
    """Two processes sharing a run (`python -u` children under `accelerate launch`) write to one
    pipe: a path and its newline in separate writes let another path in between."""
    import io
    import sys

    from ldm_cli.cli.outputs import print_written

    class Unbuffered(io.StringIO):
        writes: list[str] = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    out = Unbuffered()
    monkeypatch.setattr(sys, "stdout", out)
    print_written(tmp_path / "00001-5-a-cat.png")
    assert out.writes == [f"{tmp_path / '00001-5-a-cat.png'}\n"]
