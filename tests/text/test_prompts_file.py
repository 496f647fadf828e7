import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm_cli.core.errors import UserError
from ldm_cli.text.prompts_file import PromptJob, decode_prompts, parse_prompts, read_prompts_file


def parse(text, default_prompt=None):
    return parse_prompts(text, "p.txt", default_prompt)


def test_plain_lines_comments_and_blank_lines():
    text = "# my prompts\n\na cat, sitting\n   \n  # indented comment\n  a dog  \r\n"
    assert parse(text) == [
        PromptJob("a cat, sitting", {}, line=3),
        PromptJob("a dog", {}, line=6),
    ]


def test_option_line_in_a1111_style():
    line = (
        '--prompt "a cat" --negative_prompt "blurry" --steps 20 --seed 5 --cfg_scale 6 '
        '--sampler_name "Euler a" --width 512 --height 768 --batch_size 2 --n_iter 3'
    )
    [job] = parse(line)
    assert job.prompt == "a cat"
    assert job.overrides == {
        "negative_prompt": "blurry",
        "steps": 20,
        "seed": 5,
        "cfg": 6.0,
        "sampler": "euler_a",
        "width": 512,
        "height": 768,
        "batch_size": 2,
        "num_images": 6,
    }


def test_unquoted_prompt_words_run_to_the_next_option():
    [job] = parse("--prompt a red  cat --negative_prompt low quality, blurry --steps 4")
    assert job.prompt == "a red cat"
    assert job.overrides == {"negative_prompt": "low quality, blurry", "steps": 4}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("euler_a", {"sampler": "euler_a"}),
        ("'DPM++ 2M'", {"sampler": "dpmpp_2m"}),
        ('"dpm++ 2m sde"', {"sampler": "dpmpp_2m_sde"}),
        ("k_lms", {"sampler": "lms"}),
        ("'DPM++ 2M Karras'", {"sampler": "dpmpp_2m", "scheduler": "karras"}),
    ],
)
def test_sampler_names_are_mapped_to_ours(value, expected):
    [job] = parse(f"--prompt x --sampler_name {value}")
    assert job.overrides == expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("--scheduler Karras", {"scheduler": "karras"}),
        ("--scheduler 'SGM Uniform'", {"scheduler": "sgm_uniform"}),
        ("--scheduler Automatic", {"scheduler": "auto"}),
        ("--sampler 'DPM++ 2M Karras' --scheduler exponential", None),
    ],
)
def test_scheduler_option(options, expected):
    [job] = parse(f"--prompt x {options}")
    if expected is None:  # an explicit --scheduler wins over one in the sampler's name
        assert job.overrides == {"sampler": "dpmpp_2m", "scheduler": "exponential"}
    else:
        assert job.overrides == expected


def test_our_option_names_and_dashes_are_accepted():
    [job] = parse("--prompt x --cfg 5.5 --sampler heun --num-images 4 --batch-size 2")
    assert job.overrides == {"cfg": 5.5, "sampler": "heun", "num_images": 4, "batch_size": 2}


def test_seed_minus_one_is_the_runs_seed_as_a1111s_random():
    [job] = parse("--prompt x --seed -1 --steps 3")
    assert job.overrides == {"steps": 3}


def test_n_iter_alone_sets_the_number_of_images():
    [job] = parse("--prompt x --n_iter 3")
    assert job.overrides == {"num_images": 3}


def test_option_line_without_prompt_uses_the_command_line_prompt():
    [job] = parse("--steps 5", default_prompt="from the command line")
    assert job == PromptJob("from the command line", {"steps": 5}, line=1)
    with pytest.raises(UserError, match=r"^p.txt:1: no --prompt on this line"):
        parse("--steps 5")


def test_a_prompt_containing_dashes_later_is_a_plain_prompt():
    assert parse("a cat -- the best")[0].prompt == "a cat -- the best"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ok\n--prompt x --foo 1", "p.txt:2: unknown option --foo"),
        ("--prompt x --steps", "p.txt:1: option --steps needs a value"),
        ("--prompt x --steps --seed 3", "p.txt:1: option --steps needs a value"),
        ("--prompt", "p.txt:1: option --prompt needs a value"),
        ("--prompt x --steps ten", "p.txt:1: bad value for --steps: 'ten' is not a whole number"),
        ("--prompt x --steps 0", "p.txt:1: bad value for --steps: 0 is below 1"),
        ("--prompt x --cfg_scale nan", "p.txt:1: bad value for --cfg_scale: 'nan' is not a finite"),
        ('\n\n--prompt "a cat', "p.txt:3: unterminated quote"),
        ("--steps 3 stray", "p.txt:1: expected an option"),
        ("--prompt x --seed 1 5", "p.txt:1: expected an option starting with '--', got '5'"),
        ("--prompt x --sampler_name 'DPM fast'", "p.txt:1: unknown sampler 'DPM fast'"),
        ("--prompt x --scheduler beta", "p.txt:1: unknown schedule type 'beta'"),
        ("--prompt x --tiling true", "p.txt:1: option --tiling is not supported"),
        ("--prompt x --seed -2", "p.txt:1: bad value for --seed: -2 is below -1"),
        ("--prompt x --model y.safetensors", "p.txt:1: --model is not supported here: a run"),
        ("--prompt x --sd_model y", "p.txt:1: --sd_model is not supported here: a run uses one"),
        ("", "prompts file p.txt has no prompts"),
        ("# only\n\n   \n# comments", "prompts file p.txt has no prompts"),
    ],
)
def test_bad_lines_are_named(text, message):
    with pytest.raises(UserError) as caught:
        parse(text)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_near_miss_option_names_are_unknown():
    with pytest.raises(UserError, match="unknown option --prompts"):
        parse("--prompts x --steps 3")


def test_reads_utf8_with_and_without_bom(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffun café\n--prompt 猫 --seed 3\n".encode())
    jobs = read_prompts_file(path)
    assert [job.prompt for job in jobs] == ["un café", "猫"]
    path.write_bytes("un café".encode())
    assert read_prompts_file(path)[0].prompt == "un café"


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\na dog\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"prompts.txt:3: not valid UTF-8 \(byte 0xe9\)"):
        read_prompts_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read prompts file .*nope.txt"):
        read_prompts_file(tmp_path / "nope.txt")


option_words = st.sampled_from(
    [
        "--prompt", "--negative_prompt", "--steps", "--seed", "--cfg_scale", "--sampler_name",
        "--scheduler", "--width", "--batch_size", "--n_iter", "--foo", "--", "-5", "5", "1e9",
        "nan", "'Euler a'", '"DPM++ 2M Karras"', "Automatic", "'", '"', "\\", "#", "a cat",
        "\ufeff", "\x00", "\r", " ", "\n", "0x10", "١٢",
    ]
)  # fmt: skip
line_text = st.one_of(st.text(), st.lists(option_words, max_size=8).map(" ".join))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(line_text, max_size=5), default_prompt=st.none() | st.text(max_size=5))
def test_any_text_parses_or_raises_user_error(lines, default_prompt):
    try:
        jobs = parse("\n".join(lines), default_prompt)
    except UserError as error:
        assert "\n" not in str(error)
    else:
        assert jobs and all(isinstance(job.prompt, str) for job in jobs)


@settings(max_examples=200)
@given(data=st.binary())
def test_any_bytes_decode_or_raise_user_error(data):
    try:
        decode_prompts(data, "p.txt")
    except UserError as error:
        assert str(error).startswith("p.txt:")
