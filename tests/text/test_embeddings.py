"""Textual inversion on a tiny random checkpoint: the file formats, an embedding's name in a
prompt becoming exactly its vectors at the text encoder's input, chunking, SDXL's two towers,
the TI hashes of the PNG metadata, and the `ldm generate` options."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm_cli
from ldm_cli.checkpoints.pickled import allow_pickle
from ldm_cli.core.config import TINY_SD1, TINY_SDXL
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint, randomize_
from ldm_cli.text.chunks import prompt_chunks
from ldm_cli.text.embeddings import PLACEHOLDER_BASE, EmbeddingDatabase, read_embedding
from ldm_cli.text.tokenizer import CHUNK_TOKENS, get_tokenizer
from tests.cli_helpers import ldm, written

WIDTH = TINY_SD1.text.hidden_size


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(autouse=True, scope="module")
def pickles_allowed():
    """A1111's `.pt` embeddings are pickles: read here as under `--allow-pickle`."""
    with allow_pickle(True):
        yield


def test_a_pt_embedding_needs_allow_pickle(tmp_path):
    write_a1111_pt(tmp_path / "style.pt", vectors(1, 1))
    with allow_pickle(False), pytest.raises(UserError, match="pass --allow-pickle"):
        read_embedding(tmp_path / "style.pt")


def test_a_pt_embedding_in_a_folder_is_skipped_without_allow_pickle(pipe, embedding_dir, capsys):
    with allow_pickle(False):
        pipe.networks.load_embeddings(embedding_dir)
    try:
        assert sorted(pipe.networks.embeddings.embeddings) == ["BadHands"]
        warning = "warning: embedding shiny-style skipped: shiny-style.pt is a pickle, read only "
        assert warning + "with --allow-pickle\n" in capsys.readouterr().err
    finally:
        pipe.networks.embeddings = None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=5)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return ldm_cli.load(checkpoint, device="cpu", dtype="fp32")


def vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, tensor: torch.Tensor) -> Path:
    """A1111's own format: string_to_param {'*': Parameter[n, width]} and bookkeeping."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(tensor.clone())},
            "name": path.stem,
            "step": 1500,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "tiny",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    write_a1111_pt(root / "shiny-style.pt", vectors(3, 1))
    (root / "sub").mkdir()
    save_file({"emb_params": vectors(2, 2)}, str(root / "sub" / "BadHands.safetensors"))
    save_file(
        {"clip_l": vectors(2, 3, 64), "clip_g": vectors(2, 4, 128)},
        str(root / "xl-only.safetensors"),
    )
    return root


@pytest.fixture
def with_embeddings(pipe, embedding_dir, capsys):
    pipe.networks.load_embeddings(embedding_dir)
    yield pipe
    pipe.networks.embeddings = None


def test_formats_and_skipping(with_embeddings, embedding_dir, capsys):
    db = with_embeddings.networks.embeddings
    assert sorted(db.embeddings) == ["BadHands", "shiny-style"]
    assert db.embeddings["shiny-style"].count == 3
    assert torch.equal(db.embeddings["BadHands"].vectors["*"], vectors(2, 2))
    assert "xl-only" in db.skipped  # clip_l/clip_g: an SDXL embedding, not for SD 1.x
    err = capsys.readouterr().err
    assert (
        "warning: embedding xl-only skipped: its vectors (clip_l 64, clip_g 128) do not fit" in err
    )
    sdxl = read_embedding(embedding_dir / "xl-only.safetensors")
    assert set(sdxl) == {"clip_l", "clip_g"}


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    path.write_bytes(pickle.dumps({"string_to_param": {"*": Payload()}}))
    with pytest.raises(UserError, match=r"^evil\.pt: refused: .*nothing in it was run"):
        read_embedding(path)


def _input_embeddings(pipe, run) -> list[torch.Tensor]:
    """What `pipe`'s CLIP embeddings module (token + position embeddings) outputs in `run`."""
    seen = []
    module = pipe.text_encoder.text_model.embeddings
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_the_name_becomes_exactly_its_vectors_at_the_encoder_input(with_embeddings):
    pipe = with_embeddings
    tokenizer = pipe.tokenizer
    a, photo = tokenizer.encode_ids("a")[0], tokenizer.encode_ids("photo")[0]
    req = Request("a SHINY-STYLE photo", steps=2, width=64, height=64)
    (chunk,) = prompt_chunks(tokenizer, "a SHINY-STYLE photo", pipe.networks.embeddings)
    first = pipe.networks.embeddings.embeddings["shiny-style"].first_id
    assert chunk.ids[:6] == (tokenizer.bos_id, a, first, first + 1, first + 2, photo)

    inputs = _input_embeddings(pipe, lambda: pipe.conditioning([req]))
    row = inputs[0][0]  # the prompt's one chunk (the negative prompt is encoded after it)
    position = pipe.text_encoder.text_model.embeddings.position_embedding.weight
    stored = vectors(3, 1)
    for i in range(3):
        assert torch.equal(row[2 + i], stored[i] + position[2 + i])
    token = pipe.text_encoder.text_model.embeddings.token_embedding.weight
    assert torch.equal(row[1], token[a] + position[1])
    assert torch.equal(row[5], token[photo] + position[5])


def test_conditioning_equals_a_vocabulary_that_holds_the_vectors(with_embeddings, checkpoint):
    """An independent construction: the vectors written into rows of the token table, then
    the ids of those rows in the prompt, must give bit-identical conditioning."""
    pipe = with_embeddings
    cond, _ = pipe.conditioning([Request("a shiny-style photo", steps=2, width=64, height=64)])
    got = cond.images[0][0][0].features[0]

    reference = ldm_cli.load(checkpoint, device="cpu", dtype="fp32")
    table = reference.text_encoder.text_model.embeddings.token_embedding.weight
    spare = [400, 401, 402]
    with torch.no_grad():
        table[spare] = vectors(3, 1)
    tok = reference.tokenizer
    ids = [tok.bos_id, *tok.encode_ids("a"), *spare, *tok.encode_ids("photo"), tok.eos_id]
    ids += [tok.pad_id] * (77 - len(ids))
    with torch.inference_mode():
        expected = reference.text_encoder(torch.tensor([ids]))[0]
    assert torch.equal(got, expected)
    plain = pipe.encode_prompts(["a shiny-style photo"])[0]
    assert not torch.allclose(got, plain)


def test_an_embedding_that_does_not_fit_moves_to_the_next_chunk(with_embeddings):
    db = with_embeddings.networks.embeddings
    tokenizer = with_embeddings.tokenizer
    cat = tokenizer.encode_ids("cat")[0]
    first, second = prompt_chunks(tokenizer, " ".join(["cat"] * 73) + " shiny-style", db)
    assert first.ids[1 : 1 + 73] == (cat,) * 73 and first.ids[74] == tokenizer.eos_id
    placeholders = db.embeddings["shiny-style"].placeholders
    assert second.ids[1:4] == placeholders and second.ids[4] == tokenizer.eos_id
    # weights of emphasis apply to every vector
    (chunk,) = prompt_chunks(tokenizer, "(shiny-style:1.5)", db)
    assert chunk.weights[1:4] == (1.5, 1.5, 1.5)
    assert all(i < PLACEHOLDER_BASE for i in first.ids)
    assert len(first.ids) == len(second.ids) == CHUNK_TOKENS + 2


def test_longest_name_wins_and_unknown_words_stay_text():
    tokenizer = get_tokenizer()
    db = EmbeddingDatabase(tokenizer, {"*": 4})
    db.add("bad", Path("bad.pt"), {"*": torch.ones(1, 4)})
    db.add("bad hands", Path("bad hands.pt"), {"*": torch.ones(2, 4)})
    tokens = tokenizer.encode_ids("bad hands, bad, badly")
    found = [p for _, p in db.scan(tokens) if p]
    assert found == [db.embeddings["bad hands"].placeholders, db.embeddings["bad"].placeholders]


def test_ti_hashes_in_the_metadata(with_embeddings, embedding_dir):
    pipe = with_embeddings
    (image,) = pipe.generate(
        "a shiny-style photo", "BadHands, blurry", steps=2, seed=1, width=64, height=64
    )
    text = image.info["parameters"]

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    # A1111 encodes the negative prompt first, so its embeddings come first
    expected = (
        f"BadHands: {sha(embedding_dir / 'sub' / 'BadHands.safetensors')}, "
        f"shiny-style: {sha(embedding_dir / 'shiny-style.pt')}"
    )
    assert f'TI hashes: "{expected}"' in text
    assert parse_parameters(text).extra["TI hashes"] == expected
    (plain,) = pipe.generate("a photo", steps=1, seed=1, width=64, height=64)
    assert "TI hashes" not in plain.info["parameters"]


def test_sdxl_towers_get_their_own_vectors():
    model = randomize_(LatentDiffusion(TINY_SDXL), seed=2).eval()
    conditioner = model.conditioner
    tokenizer = get_tokenizer()
    db = EmbeddingDatabase.for_model(conditioner, tokenizer)
    assert db.widths == {"clip_l": 64, "clip_g": 128}
    clip_l, clip_g = vectors(2, 7, 64), vectors(2, 8, 128)
    assert db.add("xlstyle", Path("xlstyle.safetensors"), {"clip_l": clip_l, "clip_g": clip_g})
    assert not db.add("sd1style", Path("sd1style.pt"), {"*": vectors(1, 9, 64)})
    (chunk,) = prompt_chunks(tokenizer, "a xlstyle", db)
    seen = {}
    hooks = [
        conditioner.embedders[0].text_model.embeddings.register_forward_hook(
            lambda m, a, out: seen.update(l=out)
        ),
        conditioner.embedders[1].model.token_embedding.register_forward_hook(
            lambda m, a, out: seen.update(g_tokens=a[0])
        ),
    ]
    g_out = []
    # the injection hook is registered after ours on token_embedding, so look at its result
    # through the module that consumes it: the first resblock's input minus positions
    hooks.append(
        conditioner.embedders[1]
        .model.transformer.resblocks[0]
        .register_forward_pre_hook(lambda m, a: g_out.append(a[0]))
    )
    with torch.no_grad():
        context, pooled = db.encode(conditioner, torch.tensor([chunk.ids]))
    for handle in hooks:
        handle.remove()
    position_l = conditioner.embedders[0].text_model.embeddings.position_embedding.weight
    for i in range(2):
        assert torch.equal(seen["l"][0, 2 + i], clip_l[i] + position_l[2 + i])
    position_g = conditioner.embedders[1].model.positional_embedding
    assert torch.equal(g_out[0][0, 2:4], clip_g + position_g[2:4])
    assert int(seen["g_tokens"][0, 2]) == 0  # the model sees A1111's placeholder token 0
    assert context.shape == (1, 77, 192) and pooled.shape == (1, 96)


def test_ldm_generate_with_embeddings_and_loras(checkpoint, embedding_dir, tmp_path):
    from safetensors.torch import load_file

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    state = load_file(str(checkpoint))
    down = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))
    for name in ("ink", "detail"):
        layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        save_file(
            {
                f"{layer}.lora_down.weight": down,
                f"{layer}.lora_up.weight": torch.ones(WIDTH, 4),
                f"{layer}.alpha": torch.tensor(4.0),
            },
            str(lora_dir / f"{name}.safetensors"),
        )
    assert state  # the checkpoint is readable
    common = ["--steps", "2", "--seed", "3", "--model", str(checkpoint), "--out", str(tmp_path)]
    prompt = "a shiny-style photo <lora:ink:0.5>"
    proc = ldm(
        "generate",
        prompt,
        *common,
        "--allow-pickle",  # shiny-style.pt is an A1111 pickle
        "--embeddings",
        str(embedding_dir),
        "--lora-dir",
        str(lora_dir),
        "--lora",
        f"{lora_dir / 'detail.safetensors'}:0.25",
    )
    (image,) = written(proc)
    params = parse_parameters(read_parameters(image))
    assert params.prompt == prompt
    assert list(params.extra)[-2:] == ["Lora hashes", "TI hashes"]
    assert (
        params.extra["Lora hashes"].startswith("ink: ")
        and ", detail: " in params.extra["Lora hashes"]
    )
    assert params.extra["TI hashes"].startswith("shiny-style: ")
    assert "warning: embedding xl-only skipped" in proc.stderr
    missing = ldm("generate", "a <lora:nope>", *common, "--lora-dir", str(lora_dir), check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: LoRA 'nope' not found in")


def test_sdxl_pipeline_uses_embeddings(tmp_path):
    checkpoint = random_checkpoint(TINY_SDXL, tmp_path / "xl.safetensors", seed=6)
    pipe = ldm_cli.load(checkpoint, device="cpu", dtype="fp32")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    clip_l, clip_g = vectors(2, 11, 64), vectors(2, 12, 128)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(folder / "xlstyle.safetensors"))
    write_a1111_pt(folder / "sd1style.pt", vectors(1, 13, 64))  # CLIP-L wide, but one tensor
    plain = pipe.encode_text(["a cat", "a xlstyle"])
    pipe.networks.load_embeddings(folder)
    assert list(pipe.networks.embeddings.embeddings) == ["xlstyle"]
    with_db = pipe.encode_text(["a cat", "a xlstyle"])
    for before, after in zip(plain, with_db, strict=True):
        assert torch.equal(before[0], after[0])  # no embedding named: exactly as before
        assert not torch.allclose(before[1], after[1])
    text = pipe.parameters_text(Request("a xlstyle", steps=2, width=64, height=64))
    assert 'TI hashes: "xlstyle: ' in text
