"""Property tests: the prompts-file parser and the safetensors header check, fed anything,
either succeed or raise the documented one-line UserError; nothing else escapes."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.header import DTYPE_SIZES
from ldm_cli.checkpoints.pickled import looks_pickled
from ldm_cli.core.errors import UserError
from ldm_cli.text.prompts_file import decode_prompts, parse_prompts

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- prompts files -------------------------------------------------------------------------

WORDS = [
    "--prompt",
    "--negative_prompt",
    "--negative-prompt",
    "--steps",
    "--seed",
    "--cfg_scale",
    "--cfg",
    "--sampler_name",
    "--sampler",
    "--scheduler",
    "--width",
    "--height",
    "--batch_size",
    "--n_iter",
    "--num_images",
    "--sd_model",
    "--styles",
    "--bogus",
    "--",
    "-",
    "#",
    "'",
    '"',
    "\\",
    "'a cat'",
    '"a dog, at night"',
    "Euler a",
    "'DPM++ 2M Karras'",
    "Karras",
    "Automatic",
    "auto",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "0",
    "7",
    "99999999999999999999999",
    "3.5",
    "\u00e9",
    "\u200b",
    "\x00",
]
TOKENS = st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
LINES = st.lists(TOKENS, max_size=10).map(" ".join)
FILES = st.lists(LINES, max_size=6).map("\n".join)


def _parse(text: str) -> None:
    try:
        jobs = parse_prompts(text, "prompts.txt")
    except UserError as error:
        assert "\n" not in str(error), repr(str(error))
        assert str(error).startswith("prompts"), str(error)  # names the file (and line)
        return
    assert jobs
    for job in jobs:
        assert isinstance(job.prompt, str) and job.line >= 1
        for key, value in job.overrides.items():
            if key in ("steps", "width", "height", "batch_size", "num_images"):
                assert isinstance(value, int) and value >= 1, (key, value)


@SETTINGS
@given(FILES)
@example("--prompt 'a cat' --steps 1e309")
@example('--prompt "unterminated')
@example("--prompt x --sampler_name 'Nope Karras' --scheduler Automatic")
@example("--prompt x --cfg_scale nan")
@example("\ufeff# bom\n--steps 3")
def test_prompts_parser_from_tokens(text):
    _parse(text)


@SETTINGS
@given(st.text(max_size=200))
def test_prompts_parser_from_any_text(text):
    _parse(text)


@SETTINGS
@given(st.binary(max_size=200))
def test_prompts_decoder_from_any_bytes(data):
    try:
        text = decode_prompts(data, "prompts.txt")
    except UserError as error:
        assert "\n" not in str(error) and "UTF-8" in str(error)
        return
    _parse(text)


# -- safetensors headers -------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
SMALL = st.integers(min_value=-3, max_value=40)
ENTRIES = (
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), JSON_VALUES),
            "shape": st.one_of(st.lists(SMALL, max_size=3), JSON_VALUES),
            "data_offsets": st.one_of(st.lists(SMALL, min_size=2, max_size=2), JSON_VALUES),
        }
    )
    | JSON_VALUES
)
HEADERS = (
    st.dictionaries(st.one_of(st.just("__metadata__"), st.text(max_size=10)), ENTRIES, max_size=5)
    | JSON_VALUES
)


def _check_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(data)
        try:
            header = read_header(path)
        except UserError as error:
            assert "\n" not in str(error), repr(str(error))
            return
        size = os.path.getsize(path)
        for info in header.tensors.values():
            numel = 1
            for dim in info.shape:
                assert isinstance(dim, int) and dim >= 0
                numel *= dim
            assert info.nbytes == numel * DTYPE_SIZES[info.dtype]
            assert info.offset >= 8 and info.offset + info.nbytes <= size


def _file(header, payload: bytes, declared_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(raw) + declared_delta)) + raw + payload


@SETTINGS
@given(HEADERS, st.binary(max_size=64), st.sampled_from([0, 0, 0, -1, 1, 10**6]))
@example({"a": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}}, b"\0" * 4, 0)
@example({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 0)
@example({"a": {"dtype": "F32", "shape": "1", "data_offsets": "04"}}, b"\0" * 4, 0)
@example({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 0)
@example({"__metadata__": {"k": [1, {"x": None}]}, "a": None}, b"", 0)
def test_header_check_from_structured_headers(header, payload, delta):
    _check_file(_file(header, payload, delta))


@SETTINGS
@given(st.binary(max_size=300))
@example(struct.pack("<Q", 5_000) + b"[" * 5_000)  # deeper than Python's recursion limit
@example(struct.pack("<Q", 2) + b"[]")
@example(b"PK\x03\x04" + b"\0" * 40)
@example(b"\x80\x02" + b"\xff" * 40)
def test_header_check_from_any_bytes(data):
    _check_file(data)


@SETTINGS
@given(st.binary(max_size=64), st.sampled_from(["model.safetensors", "model.bin", "model"]))
def test_pickle_sniffing_never_crashes(data, name):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        assert looks_pickled(path) in (True, False)
