"""A batch as a plan: fixed output numbers, `--resume`, and sharing among processes.

Before anything is rendered, `ldm generate` lays out its run: image k (in the order of the
prompts, images and batches) will be written as `NNNNN-SEED-slug.png` with NNNNN = base + k,
where base is the folder's next free number when the run starts. The numbers so depend on the
job, not on when or by which process an image is finished, which gives:

- `--resume`: the files already in the folder are matched to the plan by the parameters text
  embedded in them (prompt, seeds, sampler, size, model hash, ...); base is taken from them and
  only the batches that miss an image are rendered again (whole, so that batched images keep
  their pixels), writing just the missing images, under the numbers an uninterrupted run gives.
- `accelerate launch`: every process makes the same plan (the main process reads the folder and
  shares base and the finished images), then process i renders batches i, i+N, ... of those
  left (see ldm_cli.runtime.distributed).

Files are written as by ldm_cli.cli.outputs: to a hidden temporary file, fsynced, then published
under the planned name without ever replacing a file. If another writer took the planned
number meanwhile, the image goes under the next free number instead.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.cli import outputs
from ldm_cli.cli.outputs import slugify
from ldm_cli.core.errors import UserError
from ldm_cli.core.interrupts import interrupt_after

if TYPE_CHECKING:
    from PIL import Image

    from ldm_cli.pipeline.request import Request

Progress = Callable[[int, int], None]
# render(batch, on_step, last) -> (request, image with its "parameters" info) per request, in
# order; `last`: no batch of this process follows (its weights may be given back as it goes)
Render = Callable[[list["Request"], Progress, bool], Iterable[tuple["Request", "Image.Image"]]]

_FINAL_NAME = re.compile(r"^(\d{5,})-(\d+)-(.+)\.png$")
_TEMPORARY = re.compile(r"^\.(.+)\.tmp-(\d+)-[0-9a-f]+$")
_RESERVATION = re.compile(r"^\.(\d{5,})\.reserved$")
STALE_RESERVATION_SECONDS = 10.0


@dataclass(frozen=True)
class Planned:
    """Image `index` of the run, rendered in batch `batch`."""

    index: int
    batch: int
    request: Request
    parameters: str  # the PNG's parameters text

    @property
    def stem(self) -> str:
        return f"{self.request.seed}-{slugify(self.request.prompt)}"


def plan(batches: list[list[Request]], parameters: Callable[[Request], str]) -> list[Planned]:
    """The run's images in order, each with the parameters text its PNG will carry."""
    return [
        Planned(index, b, req, parameters(req))
        for index, (b, req) in enumerate((b, r) for b, batch in enumerate(batches) for r in batch)
    ]


def check_output_dir(out: str | os.PathLike[str]) -> None:
    """Refuse an output folder that cannot be written before anything is rendered."""
    out = Path(out)
    target = out
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        if target == out:
            raise UserError(f"output path {out} exists and is not a directory")
        raise UserError(f"cannot create output directory {out}: {target} is not a directory")
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"output directory {target} is not writable")


def check_new_file(path: Path, flag: str) -> None:
    """Refuse, before any work, a report file that exists (it is never replaced) or whose
    folder cannot be made."""
    if path.exists() or path.is_symlink():
        what = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{flag} {path} is {what} already; give a new file name")
    check_output_dir(path.parent)


def write_new_file(path: Path, text: str) -> None:
    """Write `text` to a file that must not exist yet (one-line errors)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise UserError(f"{path} appeared while this ran; it was not replaced") from None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def only_main_process() -> bool:
    """For commands that do not share their work (img2img, inpaint, upscale, ...): True in
    the process that should do it all. Under a multi-process `accelerate launch` the others
    get False, so each image is still made once."""
    from ldm_cli.runtime.distributed import current, launched

    if not launched():
        return True
    shard = current()
    if shard.is_main and shard.count > 1:
        print(
            f"warning: only `ldm generate` shares its images among processes; the main one of "
            f"the {shard.count} makes them all",
            file=sys.stderr,
        )
    return shard.is_main


def _names(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    try:
        return os.listdir(out)
    except OSError as error:
        raise UserError(f"cannot list output directory {out}: {error.strerror}") from None


def find_finished(out: Path, planned: list[Planned]) -> dict[int, int]:
    """{image index: its file's number} for the planned images already in `out`.

    A file counts when its name has the image's seed and prompt slug and its embedded
    parameters text is the image's; each file stands for one image (the first in run order).
    """
    from ldm_cli.core.pngmeta import read_parameters

    wanted = {(str(p.request.seed), slugify(p.request.prompt)) for p in planned}
    numbers: dict[str, list[int]] = {}
    for name in _names(out):
        match = _FINAL_NAME.match(name)
        if not match or (match.group(2), match.group(3)) not in wanted:
            continue
        try:
            text = read_parameters(out / name)
        except UserError:  # not an image of ours: it is simply not a match
            continue
        if text is not None:
            numbers.setdefault(text, []).append(int(match.group(1)))
    for found in numbers.values():
        found.sort()
    finished = {}
    for p in planned:
        found = numbers.get(p.parameters)
        if found:
            finished[p.index] = found.pop(0)
    return finished


def base_number(out: Path, finished: dict[int, int]) -> int:
    """The number of image 0: from the finished images when resuming, else the next free."""
    if finished:
        first = min(finished)
        base = finished[first] - first
        if base >= 1:
            return base
    return outputs.next_counter(out) if out.is_dir() else 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _left_over(reservation: Path, now: float) -> bool:
    """A reservation lives for one publish: it is left over when the process it names is gone
    (killed mid-publish) or, naming none (not written yet, or an older run's), when it is old."""
    owner = outputs.reservation_owner(reservation)
    if owner is not None and not _alive(owner):
        return True
    return now - reservation.stat().st_mtime > STALE_RESERVATION_SECONDS


def clean_leftovers(out: Path, planned: list[Planned], base: int) -> list[str]:
    """Remove what a killed run of this plan left: temporary files of processes that are gone
    and stale reservations of the numbers still to write. Returns the names removed."""
    stems = {p.stem for p in planned}
    numbers = {base + p.index for p in planned}
    removed = []
    now = time.time()
    for name in _names(out):
        path = out / name
        temporary = _TEMPORARY.match(name)
        reservation = _RESERVATION.match(name)
        try:
            dead = (
                temporary is not None
                and temporary.group(1) in stems
                and not _alive(int(temporary.group(2)))
            )
            stale = (
                reservation is not None
                and int(reservation.group(1)) in numbers
                and _left_over(path, now)
            )
            if dead or stale:
                path.unlink()
                removed.append(name)
        except OSError:
            continue
    return removed


def save_png_numbered(
    image: Image.Image,
    out_dir: str | os.PathLike[str],
    number: int,
    seed: int,
    prompt: str,
    parameters: str,
) -> Path:
    """Write `image` as `<number>-SEED-slug.png` (atomically, never replacing a file); if that
    number is in use by now, as the next free one."""
    return outputs.save_png_atomic(image, out_dir, seed, prompt, parameters, number)


def run_batches(
    batches: list[list[Request]],
    render: Render,
    parameters: Callable[[Request], str],
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
) -> list[Path]:
    """Render and save the run's images as planned; with `resume`, only those not in `out`.

    Under `accelerate launch` this process renders its share of the batches. Prints each
    written path; returns them.
    """
    from ldm_cli.runtime.distributed import current

    shard = current()
    out = Path(out)
    planned = plan(batches, parameters)
    decided = None
    if shard.is_main:
        finished = find_finished(out, planned) if resume else {}
        base = base_number(out, finished)
        if resume:
            clean_leftovers(out, planned, base)
        decided = (base, finished)
    base, finished = shard.share(decided)
    if resume and shard.is_main:
        print(
            f"resume: {len(finished)} of {len(planned)} images are in {out} already; "
            f"rendering {len(planned) - len(finished)}",
            file=sys.stderr,
        )
    by_batch: dict[int, list[Planned]] = {}
    for p in planned:
        by_batch.setdefault(p.batch, []).append(p)
    todo = [b for b in range(len(batches)) if any(p.index not in finished for p in by_batch[b])]
    mine = shard.take(todo)

    def results(on_step: Progress) -> Iterator[tuple[Planned, Request, Image.Image]]:
        for b in mine:
            pairs = render(batches[b], on_step, b == mine[-1])
            for p, (req, image) in zip(by_batch[b], pairs, strict=True):
                if p.index not in finished:
                    yield p, req, image

    total = sum(1 for b in mine for p in by_batch[b] if p.index not in finished)
    return _save(results, total, out, base)


def _save(results, total: int, out: Path, base: int) -> list[Path]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    written = []
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar:
        images_task = bar.add_task("images", total=total)
        steps_task = bar.add_task("steps", total=None)

        def on_step(i: int, steps: int) -> None:
            bar.update(steps_task, completed=i, total=steps)

        for p, req, image in results(on_step):
            text = image.info.get("parameters", p.parameters)
            with interrupt_after():
                path = save_png_numbered(image, out, base + p.index, req.seed, req.prompt, text)
                outputs.print_written(path)
            written.append(path)
            bar.advance(images_task)
    return written
