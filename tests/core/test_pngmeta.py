import hashlib
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_cli.checkpoints.hash import model_hash
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import (
    RESERVED_KEYS,
    SAMPLER_LABELS,
    SCHEDULER_LABELS,
    GenerationParams,
    format_parameters,
    params_from_png,
    parse_parameters,
    read_parameters,
    write_png,
)


def make(**changes):
    values = dict(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        steps=30,
        sampler="euler_a",
        scheduler="karras",
        cfg_scale=7.5,
        seed=42,
        width=512,
        height=512,
        model_hash="1a2b3c4d5e",
        model_name="v1-5-pruned-emaonly",
    )
    values.update(changes)
    return GenerationParams(**values)


def test_format_matches_a1111_layout():
    text = format_parameters(make(extra={"Clip skip": "2", "Version": "v1.9.4"}))
    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 512x512, Model hash: 1a2b3c4d5e, Model: v1-5-pruned-emaonly, "
        "Clip skip: 2, Version: v1.9.4"
    )


def test_format_leaves_out_empty_negative_prompt_and_unknown_model():
    text = format_parameters(make(negative_prompt="", model_hash=None, model_name=None))
    assert text == (
        "a photo of a cat\n"
        "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 512x512"
    )


def test_whole_cfg_scale_is_written_without_decimals():
    assert "CFG scale: 7," in format_parameters(make(cfg_scale=7))
    assert "CFG scale: 7," in format_parameters(make(cfg_scale=7.0))


def test_values_with_commas_colons_and_quotes_are_json_quoted():
    extra = {"Lora hashes": "add_detail: 7c6bad76eb54, more: 1a2b", "Note": 'say "hi"'}
    text = format_parameters(make(model_name="C:\\models\\x", extra=extra))
    assert 'Lora hashes: "add_detail: 7c6bad76eb54, more: 1a2b"' in text
    assert 'Note: "say \\"hi\\""' in text
    assert 'Model: "C:\\\\models\\\\x"' in text
    assert parse_parameters(text).extra == extra


@pytest.mark.parametrize(("sampler", "label"), list(SAMPLER_LABELS.items()))
def test_every_sampler_round_trips_through_its_display_name(sampler, label):
    text = format_parameters(make(sampler=sampler))
    assert f"Sampler: {label}," in text
    assert parse_parameters(text).sampler == sampler


@pytest.mark.parametrize(("scheduler", "label"), list(SCHEDULER_LABELS.items()))
def test_every_schedule_is_written_explicitly(scheduler, label):
    text = format_parameters(make(sampler="dpmpp_2m", scheduler=scheduler))
    assert f"Schedule type: {label}," in text
    assert parse_parameters(text).scheduler == scheduler


A1111_19 = """masterpiece, 1girl, (blue eyes:1.2),
looking at viewer
Negative prompt: lowres, bad anatomy,
watermark
Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3551532183, \
Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, \
Clip skip: 2, Hires upscale: 2, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.9.4"""


def test_parses_a1111_19_infotext():
    params = parse_parameters(A1111_19)
    assert params.prompt == "masterpiece, 1girl, (blue eyes:1.2),\nlooking at viewer"
    assert params.negative_prompt == "lowres, bad anatomy,\nwatermark"
    assert (params.steps, params.sampler, params.scheduler) == (25, "dpmpp_2m", "karras")
    assert (params.cfg_scale, params.seed) == (7.0, 3551532183)
    assert (params.width, params.height) == (512, 768)
    assert (params.model_hash, params.model_name) == ("6ce0161689", "v1-5-pruned-emaonly")
    assert params.extra == {
        "Denoising strength": "0.7",
        "Clip skip": "2",
        "Hires upscale": "2",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Version": "v1.9.4",
    }


def test_parses_old_infotext_with_schedule_in_sampler_name():
    text = (
        "girl with a beret, desert scene\n"
        "Negative prompt: ugly\n"
        "Steps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, Seed: 965400086, "
        "Size: 512x512, Model hash: 45dee52b"
    )
    params = parse_parameters(text)
    assert (params.sampler, params.scheduler, params.model_hash) == (
        "dpmpp_2m_sde",
        "karras",
        "45dee52b",
    )


@pytest.mark.parametrize(
    ("sampler", "schedule", "expected"),
    [
        ("DPM++ 2M", None, "normal"),  # A1111 leaves it out only for the model's own spacing
        ("Euler a", "Uniform", "normal"),
        ("DPM++ 2M", "Automatic", "karras"),
        ("DPM++ 2M SDE", "Automatic", "exponential"),
        ("Euler", "Automatic", "normal"),
        ("Euler", "SGMUniform", "sgm_uniform"),
        ("DPM++ 2M Karras", "Exponential", "karras"),  # as in A1111, the name wins
    ],
)
def test_reading_schedule_types(sampler, schedule, expected):
    schedule_part = "" if schedule is None else f"Schedule type: {schedule}, "
    text = f"x\nSteps: 20, Sampler: {sampler}, {schedule_part}CFG scale: 7, Seed: 1, Size: 64x64"
    assert parse_parameters(text).scheduler == expected


def test_unknown_sampler_is_named():
    text = "x\nSteps: 20, Sampler: DPM adaptive, CFG scale: 7, Seed: 1, Size: 64x64"
    with pytest.raises(UserError, match="unknown sampler 'DPM adaptive'"):
        parse_parameters(text)


def test_unknown_schedule_type_is_named():
    text = "x\nSteps: 20, Sampler: Euler, Schedule type: Beta, CFG scale: 7, Seed: 1, Size: 8x8"
    with pytest.raises(UserError, match="unknown schedule type 'Beta'"):
        parse_parameters(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("just a prompt", "no 'Steps' field"),
        ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Size: 64x64", "no 'Seed' field"),
        ("x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", "bad Steps"),
        ("x\nSteps: 2, Sampler: Euler, CFG scale: high, Seed: 1, Size: 64x64", "bad CFG scale"),
        ("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: big", "bad Size"),
        ("x\nSteps: 0, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", "steps must be"),
    ],
)
def test_bad_parameters_text(text, problem):
    with pytest.raises(UserError, match=problem):
        parse_parameters(text)


def test_prompts_are_stored_as_a1111_reads_them_back():
    params = make(prompt="\n\n  a cat  \n\n  on a mat ", negative_prompt=" \n blurry ")
    assert params.prompt == "a cat\n\non a mat"
    assert params.negative_prompt == "blurry"


def test_prompt_line_that_looks_like_the_negative_prompt_is_refused():
    with pytest.raises(UserError, match="prompt line 2 starts with 'Negative prompt:'"):
        make(prompt="a cat\nNegative prompt: dogs")
    with pytest.raises(UserError, match="negative prompt line 2"):
        make(negative_prompt="a\nNegative prompt: b")
    # the first negative line is fine: only its own prefix is removed when reading
    params = make(negative_prompt="Negative prompt: b")
    assert parse_parameters(format_parameters(params)) == params


@pytest.mark.parametrize(
    "changes",
    [
        {"sampler": "plms"},
        {"scheduler": "beta"},
        {"steps": 0},
        {"width": 0},
        {"cfg_scale": float("nan")},
        {"seed": 1.5},
        {"extra": {"Steps": "3"}},
        {"extra": {"bad:key": "3"}},
        {"extra": {"Clip skip": 2}},
    ],
)
def test_invalid_params_are_refused(changes):
    with pytest.raises(UserError):
        make(**changes)


tricky_text = st.text(alphabet=st.sampled_from(list(',:"\\\n\r\t {}x1é漢\u2028\x85\x00-')))
any_text = st.one_of(st.text(), tricky_text)
extra_keys = st.from_regex(r"\w[\w \-/]+", fullmatch=True).filter(lambda k: k not in RESERVED_KEYS)


@st.composite
def generation_params(draw):
    values = dict(
        prompt=draw(any_text),
        negative_prompt=draw(any_text),
        steps=draw(st.integers(1, 10_000)),
        sampler=draw(st.sampled_from(sorted(SAMPLER_LABELS))),
        scheduler=draw(st.sampled_from(sorted(SCHEDULER_LABELS))),
        cfg_scale=draw(
            st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-99, 99))
        ),
        seed=draw(st.integers(-(2**64), 2**64)),
        width=draw(st.integers(1, 10_000)),
        height=draw(st.integers(1, 10_000)),
        model_hash=draw(st.none() | any_text),
        model_name=draw(st.none() | any_text),
        extra=draw(st.dictionaries(extra_keys, any_text, max_size=4)),
    )
    try:
        return GenerationParams(**values)
    except UserError:
        assume(False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(generation_params())
def test_parse_inverts_format(params):
    assert parse_parameters(format_parameters(params)) == params


def png_chunks(path):
    data = path.read_bytes()
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8].decode()
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def test_latin1_parameters_go_in_a_text_chunk(tmp_path):
    path = tmp_path / "a.png"
    write_png(Image.new("RGB", (4, 4)), path, "café\nSteps: 1")
    assert ("tEXt", b"parameters\0caf\xe9\nSteps: 1") in png_chunks(path)
    assert read_parameters(path) == "café\nSteps: 1"


def test_other_parameters_go_in_an_international_text_chunk(tmp_path):
    path = tmp_path / "a.png"
    write_png(Image.new("RGB", (4, 4)), path, "猫 🐱")
    kinds = [kind for kind, _ in png_chunks(path)]
    assert "iTXt" in kinds and "tEXt" not in kinds
    assert read_parameters(path) == "猫 🐱"


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_png_round_trip(tmp_path, text):
    path = tmp_path / "r.png"
    write_png(Image.new("L", (2, 2)), path, text)
    assert read_parameters(path) == text


def test_params_from_png(tmp_path):
    params = make(prompt="a cat, sitting\n(on a mat:1.2)", extra={"Clip skip": "2"})
    path = tmp_path / "p.png"
    write_png(Image.new("RGB", (4, 4)), path, format_parameters(params))
    assert params_from_png(path) == params


def test_reading_images_without_parameters_or_not_images(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert read_parameters(plain) is None
    with pytest.raises(UserError, match="has no generation parameters"):
        params_from_png(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image .*junk.png"):
        read_parameters(junk)
    with pytest.raises(UserError, match="cannot read image"):
        read_parameters(tmp_path / "missing.png")


def test_reads_text_chunks_after_the_image_data(tmp_path):
    path = tmp_path / "late.png"
    Image.new("RGB", (4, 4)).save(path)
    data = path.read_bytes()
    body = b"parameters\0late text"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    assert read_parameters(path) == "late text"


def test_model_hash_is_sha256_prefix_and_cached_by_size_and_mtime(tmp_path):
    path = tmp_path / "model.safetensors"
    content = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    path.write_bytes(content)
    expected = hashlib.sha256(content).hexdigest()[:10]
    assert model_hash(path) == expected
    mtime = os.stat(path).st_mtime_ns
    path.write_bytes(bytes(len(content)))  # same size ...
    os.utime(path, ns=(mtime, mtime))  # ... same mtime: the cached hash stands
    assert model_hash(str(path)) == expected
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert model_hash(path) == hashlib.sha256(bytes(len(content))).hexdigest()[:10]


def test_model_hash_of_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read model file .*nope"):
        model_hash(tmp_path / "nope")
