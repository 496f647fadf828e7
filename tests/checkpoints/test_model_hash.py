"""The model hash computed on a background thread while a command imports torch."""

from __future__ import annotations

import hashlib
import os
import threading

from ldm_cli.checkpoints import hash as hashing
from ldm_cli.checkpoints.hash import hash_in_background, model_hash


def test_background_hash_is_the_one_model_hash_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "READ_CHUNK", 1 << 16)  # several chunks
    path = tmp_path / "model.safetensors"
    content = os.urandom((1 << 18) + 5)
    path.write_bytes(content)
    started = []
    real_thread = threading.Thread

    def spy(*args, **kwargs):
        started.append(kwargs.get("name"))
        return real_thread(*args, **kwargs)

    monkeypatch.setattr(hashing.threading, "Thread", spy)
    assert hash_in_background(path)
    assert not hash_in_background(path)  # already hashing (or hashed): not started twice
    assert model_hash(path) == hashlib.sha256(content).hexdigest()[:10]
    assert started == ["ldm-model-hash"] and not hashing._running
    assert not hash_in_background(path)  # cached


def test_a_changed_file_is_hashed_again(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first")
    assert hash_in_background(path)
    assert model_hash(path) == hashlib.sha256(b"first").hexdigest()[:10]
    path.write_bytes(b"second file")
    assert hash_in_background(path)
    assert model_hash(path) == hashlib.sha256(b"second file").hexdigest()[:10]


def test_nothing_to_hash(tmp_path, monkeypatch):
    assert not hash_in_background(tmp_path / "missing.safetensors")
    monkeypatch.setenv("LDM_DEFAULT_MODEL", str(tmp_path / "missing.safetensors"))
    assert not hash_in_background(None)  # no embedded model: the command reports it


def _forget(monkeypatch):
    """A new process: nothing in memory, only what is on disk."""
    monkeypatch.setattr(hashing, "_cache", {})
    monkeypatch.setattr(hashing, "_running", {})


def test_hashes_are_kept_on_disk_for_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    hashed = []
    real_hash = hashing._sha256_prefix
    monkeypatch.setattr(hashing, "_sha256_prefix", lambda *a: hashed.append(a) or real_hash(*a))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    want = hashlib.sha256(b"weights").hexdigest()[:10]
    assert model_hash(path) == want and len(hashed) == 1
    assert (tmp_path / "cache" / "model-hashes.json").is_file()
    _forget(monkeypatch)
    assert not hash_in_background(path)  # known: no thread
    assert model_hash(path) == want and len(hashed) == 1
    _forget(monkeypatch)
    path.write_bytes(b"other weights")  # a changed file (size, mtime) is hashed again
    assert model_hash(path) == hashlib.sha256(b"other weights").hexdigest()[:10]
    assert len(hashed) == 2


def test_a_damaged_or_unwritable_cache_only_costs_the_hash(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model-hashes.json").write_text("{not json")
    monkeypatch.setenv("LDM_CACHE_DIR", str(cache))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    _forget(monkeypatch)
    assert model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LDM_CACHE_DIR", str(blocked / "sub"))
    _forget(monkeypatch)
    assert model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
