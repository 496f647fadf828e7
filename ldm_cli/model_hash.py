"""A1111's "AutoV2" model hash, computed while the command imports torch.

The hash is the first 10 hex digits of the checkpoint file's sha256, so every image's
parameters can name its model. For SD 1.5 in fp16 that is 2 GB to hash, about a second of one
core, which used to come after the image was made. The `ldm` commands now call
``hash_in_background(path)`` before they import torch: importing torch keeps one core busy
for about a second and leaves the other idle, and hashlib and file reads release the GIL, so
most of the hash is done before the model starts loading. The thread runs at the lowest
priority, so it does not slow loading or sampling, and ``model_hash`` waits for it (it then
gets the core the waiting frees) instead of starting another. Reads are in large chunks so
the thread needs the GIL rarely.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

from ldm_cli.errors import UserError

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


def _hash_into_cache(key: _Key) -> None:
    _lowest_priority()
    try:
        short = _sha256_prefix(key[0], key[1])
    except OSError:  # model_hash reports it, in the foreground
        return
    with _lock:
        _cache[key] = short


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
        from .embedded import default_model_path

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
        if cached is not None:
            return cached
        short = _sha256_prefix(key[0], key[1])
    except OSError as error:
        name = os.path.abspath(os.fspath(path))
        raise UserError(f"cannot read model file {name}: {error.strerror or error}") from None
    with _lock:
        _cache[key] = short
    return short
