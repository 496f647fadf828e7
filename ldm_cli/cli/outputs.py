"""Output PNGs named `NNNNN-SEED-slug.png`, written atomically and never over another file.

Several processes may write into one folder at once. Each image is written and fsynced to a
hidden temporary file first, then published under the next free counter:

1. reserve the counter by creating `.NNNNN.reserved` with O_EXCL (one writer per counter);
2. check that no finished file already uses that counter (one that was published and whose
   reservation is gone by now), otherwise move on;
3. hard-link the temporary file to the final name, which fails rather than replace a file
   (where the filesystem has no hard links: create the name with O_EXCL, then rename over it);
4. drop the reservation.

So counters stay unique across writers. A writer killed between 1 and 4 leaves its
reservation behind; that only skips one counter.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import unicodedata
from pathlib import Path

from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import write_png
from ldm_cli.networks.tags import EXTRA_NETWORK

SLUG_LENGTH = 48
_FINAL_RE = re.compile(r"^(\d{5,})-")  # 5 digits, more once past 99999
_RESERVATION_RE = re.compile(r"^\.(\d{5,})\.reserved$")
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)


def slugify(prompt: str) -> str:
    """Lowercase ASCII letters and digits, other runs as one dash, at most 48 characters;
    ``<lora:...>`` tags, which are not part of the prompt's text, are left out."""
    prompt = EXTRA_NETWORK.sub(" ", prompt)
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:SLUG_LENGTH].rstrip("-") or "image"


def output_name(counter: int, seed: int | None, prompt: str) -> str:
    """`NNNNN-SEED-slug.png`; `NNNNN-slug.png` for an image no seed made (a feed-forward
    upscale)."""
    if seed is None:
        return f"{counter:05d}-{slugify(prompt)}.png"
    return f"{counter:05d}-{seed}-{slugify(prompt)}.png"


def _list_dir(out_dir: Path) -> list[str]:
    try:
        return os.listdir(out_dir)
    except OSError as error:
        raise UserError(f"cannot list output directory {out_dir}: {error.strerror}") from None


def _final_counters(names: list[str]) -> set[int]:
    return {int(match.group(1)) for name in names if (match := _FINAL_RE.match(name))}


def next_counter(out_dir: str | os.PathLike[str]) -> int:
    """One more than the highest counter in use (published files and reservations)."""
    names = _list_dir(Path(out_dir))
    reserved = {int(m.group(1)) for name in names if (m := _RESERVATION_RE.match(name))}
    return max(_final_counters(names) | reserved, default=0) + 1


def _make_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"cannot create output directory {out_dir}: {reason}") from None


def _create_exclusive(path: Path) -> int | None:
    """A new file's descriptor (mode from the umask), or None if the name is taken."""
    try:
        return os.open(path, _NEW_FILE, 0o666)
    except FileExistsError:
        return None


def reserve(path: Path) -> bool:
    """Create the reservation `path` exclusively, holding this process's id (so a resumed run
    can tell one left by a killed process from a live writer's); False if it is taken."""
    descriptor = _create_exclusive(path)
    if descriptor is None:
        return False
    try:
        os.write(descriptor, str(os.getpid()).encode())
    except OSError:  # a full disk: no empty reservation left behind
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    return True


def reservation_owner(path: Path) -> int | None:
    """The process id a reservation holds; None if it is unreadable or not written yet."""
    try:
        text = path.read_bytes()[:20].decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _write_temporary(image: Image.Image, out_dir: Path, stem: str, parameters: str) -> Path:
    while True:
        temporary = out_dir / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            descriptor = _create_exclusive(temporary)
        except OSError as error:
            reason = error.strerror or error
            raise UserError(f"output directory {out_dir} is not writable: {reason}") from None
        if descriptor is not None:
            break
    try:
        with os.fdopen(descriptor, "wb") as file:
            write_png(image, file, parameters)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _link_without_overwrite(source: Path, target: Path) -> bool:
    """Give `source`'s content the name `target` unless that name exists; True on success."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # no hard links on this filesystem (FAT, some network mounts)
    descriptor = _create_exclusive(target)
    if descriptor is None:
        return False
    os.close(descriptor)
    os.replace(source, target)  # replaces only the empty placeholder we just created
    return True


def _sync_directory(directory: Path) -> None:
    """Make the new name durable; not possible everywhere (Windows), so best effort."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish_as(temporary: Path, out_dir: Path, number: int, seed: int | None, prompt: str):
    """Link `temporary` into `out_dir` as output `number` (its `NNNNN-SEED-slug.png`) unless
    another image holds or is taking that number: then None. The number is reserved first
    (an exclusive `.NNNNN.reserved` file), so two processes never publish under one."""
    reservation = out_dir / f".{number:05d}.reserved"
    try:
        if not reserve(reservation):
            return None
    except OSError as error:
        raise UserError(f"cannot write in output directory {out_dir}: {error}") from None
    try:
        if number in _final_counters(_list_dir(out_dir)):
            return None
        target = out_dir / output_name(number, seed, prompt)
        return target if _link_without_overwrite(temporary, target) else None
    except OSError as error:
        raise UserError(f"cannot write in output directory {out_dir}: {error}") from None
    finally:
        reservation.unlink(missing_ok=True)


def save_png_atomic(
    image: Image.Image,
    out_dir: str | os.PathLike[str],
    seed: int | None,
    prompt: str,
    parameters: str,
    number: int | None = None,
) -> Path:
    """Write `image` with its parameters text as the next `NNNNN-SEED-slug.png` in `out_dir`
    (atomically, never replacing a file); with `number`, as that output number if it is still
    free, else the next free one."""
    out_dir = Path(out_dir)
    _make_output_dir(out_dir)
    temporary = _write_temporary(image, out_dir, f"{seed}-{slugify(prompt)}", parameters)
    try:
        target = None if number is None else publish_as(temporary, out_dir, number, seed, prompt)
        counter = next_counter(out_dir) if target is None else 0
        while target is None:
            target = publish_as(temporary, out_dir, counter, seed, prompt)
            counter = max(counter + 1, next_counter(out_dir))
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(out_dir)
    return target


def print_written(path: Path) -> None:
    """Print a written image's path on a line of its own, in one write: processes that share
    a run (`accelerate launch` starts them with `python -u`, so print's two writes are two
    system calls) would otherwise split each other's lines between a path and its newline."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def save_png_as(image: Image.Image, target: Path, parameters: str = "") -> Path:
    """Write `image` as exactly `target` (atomically); a UserError if that file exists."""
    target = Path(target)
    _make_output_dir(target.parent)
    temporary = _write_temporary(image, target.parent, target.stem, parameters)
    try:
        if not _link_without_overwrite(temporary, target):
            raise UserError(f"{target} exists; choose another --out (nothing was overwritten)")
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(target.parent)
    return target
