"""A1111's "AutoV2" model hash, computed while the command imports torch.

The hash is the first 10 hex digits of the checkpoint file's sha256, so every image's
parameters can name its model. For SD 1.5 in fp16 that is 2 GB to hash, about a second of one
core, which used to come after the image was made. The `ldm` commands now call
``hash_in_background(path)`` before they import torch: importing torch keeps one core busy
for about a second and leaves the other idle, and hashlib and file reads release the GIL, so
about half of the hash is done before the model starts loading. The thread runs at the
lowest priority, so it hardly slows loading or sampling, and ``model_hash`` waits for it (it then
gets the core the waiting frees) instead of starting another. Reads are in large chunks so
the thread needs the GIL rarely.

Hashes are also kept on disk (``hash_cache_path``: a small JSON file keyed by the file's path,
size and modification time, as A1111 keeps its ``cache.json``), so only the first run on a
model pays for hashing it. That matters because the niced thread does not finish during
loading: with both cores sampling it gets a sliver of one, so about 0.5 s of it was left for
the PNG to wait on at the end of an SD 1.5 run, and its time slices preempted a sampling
thread (the 256x256 VAE decode measured 1.16-1.18 s with it running against 1.12-1.13).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from ldm_cli.core.errors import UserError

READ_CHUNK = 32 << 20
_Key = tuple[str, int, int]
_cache: dict[_Key, str] = {}
_running: dict[_Key, threading.Thread] = {}
_lock = threading.Lock()


def _key(path: str | os.PathLike[str]) -> _Key:
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    return (path, stat.st_size, stat.st_mtime_ns)


def _sha256_prefix(path: str, size: int) -> str:
    digest = hashlib.sha256()
    view = memoryview(bytearray(max(1, min(READ_CHUNK, size))))
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(view):
            digest.update(view[:count])
    return digest.hexdigest()[:10]


def hash_cache_path() -> Path:
    """$LDM_CACHE_DIR, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm; then model-hashes.json."""
    folder = os.environ.get("LDM_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "ldm")
    return Path(folder) / "model-hashes.json"


def _read_disk_cache() -> dict:
    try:
        entries = json.loads(hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, unreadable or damaged: hash again
        return {}
    return entries if isinstance(entries, dict) else {}


def _from_disk(key: _Key) -> str | None:
    entry = _read_disk_cache().get(key[0])
    if not isinstance(entry, dict) or [entry.get("size"), entry.get("mtime_ns")] != [*key[1:]]:
        return None
    short = entry.get("hash")
    return short if isinstance(short, str) and len(short) == 10 else None


def _to_disk(key: _Key, short: str) -> None:
    """Add one entry, written whole to a temporary file and renamed over the cache, so a
    reader never sees half a file; a cache that cannot be written is only a lost speed-up."""
    path = hash_cache_path()
    entries = _read_disk_cache()
    entries[key[0]] = {"size": key[1], "mtime_ns": key[2], "hash": short}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".model-hashes.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(entries, file, indent=0)
            os.replace(temporary, path)
        except OSError:
            os.unlink(temporary)
            raise


def _hash_into_cache(key: _Key) -> None:
    _lowest_priority()
    try:
        short = _sha256_prefix(key[0], key[1])
    except OSError:  # model_hash reports it, in the foreground
        return
    with _lock:
        _cache[key] = short
    _to_disk(key, short)


def _lowest_priority() -> None:
    """Nice this thread (Linux: a thread is a task) so it only takes otherwise idle time:
    while the model loads and samples it waits, and whatever is left runs when `model_hash`
    waits for it."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def hash_in_background(path: str | os.PathLike[str] | None) -> bool:
    """Start hashing `path` (None: the embedded default model) on a daemon thread; False
    when there is nothing to start (no such file, hashed or hashing already)."""
    if path is None:
        from ldm_cli.core.embedded import default_model_path

        try:
            path = default_model_path()
        except UserError:
            return False
    try:
        key = _key(path)
    except OSError:
        return False
    with _lock:
        if key in _cache or key in _running:
            return False
    known = _from_disk(key)
    with _lock:
        if known is not None:
            _cache[key] = known
            return False
        if key in _cache or key in _running:
            return False
        thread = threading.Thread(
            target=_hash_into_cache, args=(key,), name="ldm-model-hash", daemon=True
        )
        _running[key] = thread
    thread.start()
    return True


def model_hash(path: str | os.PathLike[str] | Path) -> str:
    """A1111's "AutoV2" short hash: the first 10 hex digits of the file's sha256; cached by
    path, size and modification time."""
    try:
        key = _key(path)
        with _lock:
            running = _running.pop(key, None)
        if running is not None:
            running.join()
        with _lock:
            cached = _cache.get(key)
        if cached is None:
            cached = _from_disk(key)
        if cached is not None:
            with _lock:
                _cache[key] = cached
            return cached
        short = _sha256_prefix(key[0], key[1])
    except OSError as error:
        name = os.path.abspath(os.fspath(path))
        raise UserError(f"cannot read model file {name}: {error.strerror or error}") from None
    with _lock:
        _cache[key] = short
    _to_disk(key, short)
    return short
