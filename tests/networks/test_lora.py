"""LoRA on seeded random weights: kohya/A1111 and diffusers/PEFT files patched into our model
equal what diffusers' ``load_lora_weights`` + ``fuse_lora`` make of the same base weights;
the base weights come back bit for bit; prompt tags, ``--lora`` and the PNG metadata."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm_cli
from ldm_cli.core.config import TINY_SD1, TINY_SD2, TINY_SDXL
from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.networks.keys import UNET_ROOT, diffusers_unet_path, layer_table
from ldm_cli.networks.tags import LoraTag, parse_lora_option, parse_tags
from ldm_cli.testing import random_checkpoint, randomize_
from tests.reference_configs import diffusers_unet_config, diffusers_vae_config

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

TE_ROOT = "cond_stage_model.transformer."
# transformers 5's CLIPTextModel has no `text_model` level; LoRA files name it all the same
TEXT_MODEL = "text_model."
ATOL = 1e-5
SDXL_TIME_EMBED = (TINY_SDXL.unet.adm_in_channels - TINY_SDXL.text2.projection_dim) // 6


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return ldm_cli.load(checkpoint, device="cpu", dtype="fp32")


@pytest.fixture
def fresh(pipe):
    """The module's pipeline with no LoRA applied before and after the test."""
    pipe.networks.restore()
    pipe.networks.loras = []
    yield pipe
    pipe.networks.restore()
    pipe.networks.loras = []
    pipe.networks.embeddings = None


# -- the U-Net name correspondence ----------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_SD1, TINY_SD2, TINY_SDXL], ids=["sd1", "sd2", "sdxl"])
def test_unet_paths_match_diffusers_conversion_tensor_by_tensor(cfg):
    """Our original-layout path -> diffusers path, checked against diffusers' own checkpoint
    conversion: every Linear/Conv2d weight lands on the diffusers weight with its values."""
    model = randomize_(LatentDiffusion(cfg), seed=1)
    unet = model.model.diffusion_model
    config = diffusers_unet_config(cfg.unet, SDXL_TIME_EMBED)
    state = {UNET_ROOT + k: v for k, v in unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(state, config)
    kinds = {n: type(m).__name__ for n, m in unet.named_modules()}
    mapped = set()
    for path, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        renamed = diffusers_unet_path(path, cfg.unet.num_res_blocks, kinds)
        assert renamed is not None, path
        assert torch.equal(converted[renamed + ".weight"], module.weight), (path, renamed)
        mapped.add(renamed + ".weight")
    reference = diffusers.UNet2DConditionModel(**config)
    layers = {
        n + ".weight"
        for n, m in reference.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    assert mapped == layers


# -- LoRA files made for the test -----------------------------------------------------------


def diffusers_sd1(checkpoint: Path):
    """diffusers' StableDiffusionPipeline holding the same weights as our `checkpoint`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.reference_configs import transformers_clip_config

    state = load_file(str(checkpoint))
    config = diffusers_unet_config(TINY_SD1.unet)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, config))
    text = CLIPTextModel(CLIPTextConfig(**transformers_clip_config(TINY_SD1.text)))
    text.load_state_dict(_text_state(state))
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(TINY_SD1.vae))
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text.eval(),
        tokenizer=None,
        unet=unet.eval(),
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _text_state(state: dict) -> dict:
    """Our text encoder's weights under transformers 5's CLIPTextModel names."""
    root = TE_ROOT + TEXT_MODEL
    text = {k[len(root) :]: v for k, v in state.items() if k.startswith(root)}
    text.pop("embeddings.position_ids", None)
    return text


def _lora_targets(pipe_d) -> tuple[list[tuple[str, torch.nn.Module]], list]:
    unet = [
        (n, m)
        for n, m in pipe_d.unet.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and "norm" not in n
    ]
    text = [
        (n, m) for n, m in pipe_d.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    return unet, text


def _pair(module: torch.nn.Module, rank: int, gen: torch.Generator):
    """(down, up) for a layer: LoCon (3x3 down, 1x1 up) for convolutions."""
    weight = module.weight
    if weight.ndim == 4:
        down = torch.randn(rank, *weight.shape[1:], generator=gen) * 0.3
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen) * 0.3
    else:
        down = torch.randn(rank, weight.shape[1], generator=gen) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=gen) * 0.3
    return down, up


def write_kohya(path: Path, pipe_d, *, ldm_unet_names: bool = False, seed: int = 0) -> Path:
    """A kohya/A1111 file over every U-Net and text-encoder layer (alpha 2 or 3, rank 4),
    U-Net names from diffusers' paths or (``ldm_unet_names``) the original LDM ones."""
    gen = torch.Generator().manual_seed(seed)
    unet, text = _lora_targets(pipe_d)
    original = {}
    if ldm_unet_names:
        original = _diffusers_to_ldm_unet_names(TINY_SD1)
    state = {}
    for index, (name, module) in enumerate(unet + text):
        is_unet = index < len(unet)
        if is_unet:
            flat = original.get(name, name) if ldm_unet_names else name
            key = "lora_unet_" + flat.replace(".", "_")
        else:
            key = "lora_te_" + (TEXT_MODEL + name).replace(".", "_")
        down, up = _pair(module, 4, gen)
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def _diffusers_to_ldm_unet_names(cfg) -> dict[str, str]:
    """diffusers module path -> original path, from diffusers' own checkpoint conversion."""
    model = randomize_(LatentDiffusion(cfg), seed=7)
    unet = model.model.diffusion_model
    config = diffusers_unet_config(cfg.unet)
    converted = convert_ldm_unet_checkpoint(
        {UNET_ROOT + k: v for k, v in unet.state_dict().items()}, config
    )
    names = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            (match,) = [k for k, v in converted.items() if torch.equal(v, module.weight)]
            names[match.removesuffix(".weight")] = path
    return names


def write_peft(path: Path, pipe_d, seed: int = 1, alphas=(8.0, 2.0)) -> Path:
    """A diffusers/PEFT file (``unet.<path>.lora_A.weight``) with diffusers' adapter metadata
    giving lora_alpha for the U-Net and the text encoder."""
    gen = torch.Generator().manual_seed(seed)
    unet, text = _lora_targets(pipe_d)
    state, metadata = {}, {}
    text = [(TEXT_MODEL + name, module) for name, module in text]
    for component, layers, alpha in (("unet", unet, alphas[0]), ("text_encoder", text, alphas[1])):
        for name, module in layers:
            down, up = _pair(module, 4, gen)
            state[f"{component}.{name}.lora_A.weight"] = down
            state[f"{component}.{name}.lora_B.weight"] = up
        metadata.update(
            {
                f"{component}.r": 4,
                f"{component}.lora_alpha": alpha,
                # PEFT matches module names by suffix, as real adapter configs list them
                f"{component}.target_modules": sorted({name.split(".")[-1] for name, _ in layers})
                if component == "text_encoder"
                else sorted(name for name, _ in layers),
            }
        )
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def _fused(pipe_d, lora: Path, scale: float) -> tuple[dict, dict]:
    """diffusers' fused weights; the pipeline gets its exact base weights back after."""
    base = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in _parts(pipe_d)]
    pipe_d.load_lora_weights(str(lora))
    pipe_d.fuse_lora(lora_scale=scale)

    def clean(module):
        return {
            k.replace(".base_layer", ""): v.detach().clone()
            for k, v in module.state_dict().items()
            if "lora_" not in k
        }

    unet, text = clean(pipe_d.unet), clean(pipe_d.text_encoder)
    pipe_d.unfuse_lora()
    pipe_d.unload_lora_weights()
    for module, state in base:  # unfusing subtracts, which is not exact
        module.load_state_dict(state)
    return unet, text


def _parts(pipe_d) -> list[torch.nn.Module]:
    return [pipe_d.unet, pipe_d.text_encoder]


def _ours_in_diffusers_names(pipe) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    config = diffusers_unet_config(TINY_SD1.unet)
    unet = convert_ldm_unet_checkpoint(dict(state), config)
    return unet, _text_state(state)


def _max_diff(ours: dict, theirs: dict) -> float:
    ours = {k: v for k, v in ours.items() if "position_ids" not in k}
    theirs = {k: v for k, v in theirs.items() if "position_ids" not in k}
    assert ours.keys() == theirs.keys()
    return max((ours[key] - value).abs().max().item() for key, value in theirs.items())


@pytest.fixture(scope="module")
def reference(checkpoint):
    return diffusers_sd1(checkpoint)


@pytest.mark.parametrize(
    ("kind", "scale"),
    [("kohya-diffusers-names", 0.7), ("kohya-ldm-names", 1.3), ("peft", 0.8)],
)
def test_patched_weights_equal_diffusers_fuse_lora(fresh, reference, tmp_path, kind, scale):
    pipe = fresh
    path = tmp_path / f"{kind}.safetensors"
    if kind == "peft":
        theirs = write_peft(path, reference)
    else:
        theirs = write_kohya(tmp_path / "diffusers-names.safetensors", reference)
        # the same tensors under the original LDM names (diffusers' loader leaves such
        # SD 1.x files unapplied, so its reference is the diffusers-named file)
        write_kohya(path, reference, ldm_unet_names=kind == "kohya-ldm-names")
    base_unet, base_text = _ours_in_diffusers_names(pipe)
    their_unet, their_text = _fused(reference, theirs, scale)

    pipe.networks.apply([(path, scale, scale)])
    our_unet, our_text = _ours_in_diffusers_names(pipe)
    assert our_unet.keys() == their_unet.keys() and our_text.keys() == their_text.keys()
    unet_diff, text_diff = _max_diff(our_unet, their_unet), _max_diff(our_text, their_text)
    print(f"{kind}: max |ours - diffusers| U-Net {unet_diff:.2e}, text encoder {text_diff:.2e}")
    assert unet_diff < ATOL and text_diff < ATOL
    # the LoRA changed every layer it names (the comparison is not of untouched weights)
    changed = [k for k in their_unet if (their_unet[k] - base_unet[k]).abs().max() > 1e-3]
    assert len(changed) == len(layer_names(path)[0])
    assert any((their_text[k] - base_text[k]).abs().max() > 1e-3 for k in their_text)


def layer_names(path: Path) -> tuple[set[str], set[str]]:
    keys = [k for k in load_file(str(path)) if k.endswith(("lora_down.weight", "lora_A.weight"))]
    unet = {k.split(".lora")[0] for k in keys if k.startswith(("lora_unet_", "unet."))}
    text = {k.split(".lora")[0] for k in keys if k.startswith(("lora_te", "text_encoder."))}
    return unet, text


def test_restore_is_bit_exact_and_several_loras_add_up(fresh, reference, tmp_path):
    pipe = fresh
    pristine = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    first = write_kohya(tmp_path / "a.safetensors", reference, seed=5)
    second = write_peft(tmp_path / "b.safetensors", reference, seed=6)

    def delta(loras):
        pipe.networks.apply(loras)
        out = {k: v - pristine[k] for k, v in pipe.model.state_dict().items()}
        pipe.networks.restore()
        return out

    a, b = delta([(first, 0.5, 0.5)]), delta([(second, -1.0, 2.0)])
    both = delta([(first, 0.5, 0.5), (second, -1.0, 2.0)])
    assert max((both[k] - a[k] - b[k]).abs().max().item() for k in both) < 1e-5
    # text encoder and U-Net multipliers act on their own parts
    te_only = delta([(first, 1.0, 0.0)])
    assert all(not v.any() for k, v in te_only.items() if k.startswith(UNET_ROOT))
    assert any(v.any() for k, v in te_only.items() if k.startswith(TE_ROOT))

    pipe.networks.apply([(first, 1.0, 1.0), (second, 0.3, 0.3)])
    pipe.networks.apply([(second, 1.0, 1.0)])  # a new set: restored, then patched again
    with torch.inference_mode():  # as when called from inside a sampling loop
        pipe.networks.apply([(first, 1.0, 1.0)])
    pipe.networks.restore()
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], pristine[k]) for k in pristine)


def test_prompt_tags_apply_for_the_run_and_go_away_after(fresh, reference, tmp_path):
    pipe = fresh
    folder = tmp_path / "Lora" / "styles"
    folder.mkdir(parents=True)
    write_kohya(folder / "ink.safetensors", reference, seed=9)
    pipe.networks.lora_dir = tmp_path / "Lora"
    pristine = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    options = {"steps": 2, "seed": 3, "sampler": "euler", "width": 64, "height": 64}
    (plain,) = pipe.generate("a red circle", **options)
    (styled,) = pipe.generate("a red circle <lora:ink:0.8>", **options)
    touched = pipe.model.state_dict()
    assert any(not torch.equal(touched[k], pristine[k]) for k in pristine)
    (again,) = pipe.generate("a red circle", **options)
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], pristine[k]) for k in pristine)
    assert list(plain.getdata()) == list(again.getdata())
    assert list(plain.getdata()) != list(styled.getdata())

    # the tag is not text: the conditioning is that of the prompt without it, LoRA applied
    cond, _ = pipe.conditioning(
        [ldm_cli.pipeline.base.Request("a red circle <lora:ink:0.8>", steps=2, width=64, height=64)]
    )
    expected = pipe.encode_prompts(["a red circle "])[0]
    assert torch.equal(cond.images[0][0][0].features[0], expected)
    pipe.networks.restore()

    text = styled.info["parameters"]
    assert f'Lora hashes: "ink: {addnet_hash(folder / "ink.safetensors")}"' in text
    assert "<lora:ink:0.8>" in text.splitlines()[0]


def addnet_hash(path: Path) -> str:
    """kohya's hash, which A1111 writes: sha256 of a safetensors file after its header."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length :]).hexdigest()[:12]


def test_lora_option_applies_to_every_prompt_and_is_recorded(fresh, reference, tmp_path):
    pipe = fresh
    path = write_peft(tmp_path / "detail.safetensors", reference)
    pipe.networks.add_lora(f"{path}:0.6")
    req = ldm_cli.pipeline.base.Request("a cat", steps=2, width=64, height=64)
    pipe.conditioning([req])
    assert pipe.networks._applied
    assert f'Lora hashes: "detail: {addnet_hash(path)}"' in pipe.parameters_text(req)


# -- parsing and errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a cat <lora:ink:0.8>", "a cat ", [LoraTag("ink", 0.8, 0.8)]),
        ("<lora:ink>a cat", "a cat", [LoraTag("ink", 1.0, 1.0)]),
        ("<lora:a:0.5:1.5> x <lyco:b:-1>", " x ", [LoraTag("a", 0.5, 1.5), LoraTag("b", -1, -1)]),
        ("<lora:a:te=0.2:unet=0.7>", "", [LoraTag("a", 0.2, 0.7)]),
        ("<lora:my style v2:1>", "", [LoraTag("my style v2", 1.0, 1.0)]),
        ("a (cat:1.2) <3 [dog:0.5]", "a (cat:1.2) <3 [dog:0.5]", []),
    ],
)
def test_lora_tags(prompt, text, tags):
    assert parse_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:ink:strong>", "LoRA weight 'strong' in <lora:ink:strong> is not a number"),
        ("<lora::1>", "names no LoRA"),
        ("<hypernet:x:1>", "unsupported extra network <hypernet:...>"),
    ],
)
def test_bad_tags_are_one_line_errors(prompt, message):
    with pytest.raises(UserError, match=message):
        parse_tags(prompt)


def test_lora_option_parsing(tmp_path):
    assert parse_lora_option("x/style.safetensors:0.5") == LoraTag(
        "style", 0.5, 0.5, Path("x/style.safetensors")
    )
    assert parse_lora_option("x/style.safetensors").te == 1.0
    assert parse_lora_option("C:/loras/a.pt:-0.25").path == Path("C:/loras/a.pt")
    assert parse_lora_option("ink:2").name == "ink"  # a name in the LoRA folder
    for bad, word in [("x/style.safetensors:abc", "abc"), ("ink:nan", "nan"), ("a.pt:inf", "inf")]:
        with pytest.raises(UserError, match=f"LoRA weight '{word}' in --lora .* is not a"):
            parse_lora_option(bad)


def test_add_lora_checks_its_file_and_weight_and_clear_loras_undoes_it(fresh, reference, tmp_path):
    pipe = fresh
    with pytest.raises(UserError, match="LoRA file nope.safetensors not found"):
        pipe.networks.add_lora("nope.safetensors", 0.8)
    path = write_peft(tmp_path / "detail.safetensors", reference)
    with pytest.raises(UserError, match="LoRA weight 'x' in add_lora"):
        pipe.networks.add_lora(path, "x")
    assert pipe.networks.loras == []
    base = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.networks.add_lora(path, 0.8)
    req = ldm_cli.pipeline.base.Request("a cat", steps=2, width=64, height=64)
    pipe.conditioning([req])
    assert "Lora hashes" in pipe.parameters_text(req)
    pipe.networks.clear_loras()
    assert all(torch.equal(v, base[k]) for k, v in pipe.model.state_dict().items())
    pipe.conditioning([req])  # nothing is applied again
    assert "Lora hashes" not in pipe.parameters_text(req)
    assert all(torch.equal(v, base[k]) for k, v in pipe.model.state_dict().items())


def test_layers_that_match_nothing_are_counted_in_a_warning(fresh, reference, tmp_path, capsys):
    path = write_kohya(tmp_path / "extra.safetensors", reference)
    state = load_file(str(path))
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, str(path))
    fresh.networks.apply([(path, 1.0, 1.0)])
    err = capsys.readouterr().err.strip().splitlines()
    total = sum(len(names) for names in layer_names(path))
    assert err == [
        f"warning: LoRA extra.safetensors: 1 of {total} layers match nothing in this model "
        "and are skipped (e.g. lora_unet_not_a_layer)"
    ]


def test_a_lora_for_another_model_is_a_one_line_error(fresh, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(
        {
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
        },
        str(path),
    )
    with pytest.raises(UserError, match=r"matches no layer of this model .*lora_te2_text_model"):
        fresh.networks.apply([(path, 1.0, 1.0)])
    wrong_shape = tmp_path / "wide.safetensors"
    save_file(
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        },
        str(wrong_shape),
    )
    with pytest.raises(UserError, match="does not fit this model: layer .*mlp.fc1.weight is 37x32"):
        fresh.networks.apply([(wrong_shape, 1.0, 1.0)])
    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(loha)
    )
    with pytest.raises(UserError, match="LyCORIS LoHa"):
        fresh.networks.apply([(loha, 1.0, 1.0)])


def test_missing_lora_names_the_folder(fresh, tmp_path):
    fresh.networks.lora_dir = tmp_path
    with pytest.raises(UserError, match=r"LoRA 'nope' not found in .* --lora-dir"):
        fresh.conditioning(
            [ldm_cli.pipeline.base.Request("<lora:nope:1>", steps=1, width=64, height=64)]
        )


def test_openclip_towers_map_q_k_v_to_rows_of_the_fused_projection():
    with torch.device("meta"):
        model = LatentDiffusion(TINY_SDXL)
    table = layer_table(model)
    width = TINY_SDXL.text2.hidden_size
    root = "conditioner.embedders.1.model.transformer.resblocks.2."
    for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        for name in (
            f"lora_te2_text_model_encoder_layers_2_self_attn_{proj}",
            f"text_encoder_2.text_model.encoder.layers.2.self_attn.{proj}",
        ):
            target = table[name]
            assert target.param == root + "attn.in_proj_weight"
            assert target.rows == (k * width, (k + 1) * width)
    assert table["lora_te2_text_model_encoder_layers_2_mlp_fc1"].param == root + "mlp.c_fc.weight"
    clip_l = (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert table["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].param == clip_l
    sgm = table["lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k"]
    assert sgm == table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"]
    assert sgm == table["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"]
    assert sgm.param == UNET_ROOT + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"


# -- SDXL: two text towers, OpenCLIP's fused q/k/v, original-layout U-Net names ---------------


def _diffusers_sdxl(model: LatentDiffusion):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.reference_configs import transformers_clip_config

    state = model.state_dict()
    config = diffusers_unet_config(TINY_SDXL.unet, SDXL_TIME_EMBED)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, config))
    clip_l = CLIPTextModel(CLIPTextConfig(**transformers_clip_config(TINY_SDXL.text)))
    root = "conditioner.embedders.0.transformer.text_model."
    clip_l.load_state_dict({k[len(root) :]: v for k, v in state.items() if k.startswith(root)})
    bigg = TINY_SDXL.text2
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**transformers_clip_config(bigg), "projection_dim": bigg.projection_dim})
    )
    clip_g.load_state_dict(_bigg_state(clip_g, state), strict=False)
    return diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**diffusers_vae_config(TINY_SDXL.vae)),
        text_encoder=clip_l.eval(),
        text_encoder_2=clip_g.eval(),
        tokenizer=None,
        tokenizer_2=None,
        unet=unet.eval(),
        scheduler=diffusers.EulerDiscreteScheduler(),
    )


def _bigg_state(clip_g, state: dict) -> dict:
    """Our bigG tower (OpenCLIP layout, fused in_proj) in transformers' names."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."
    converted = convert_open_clip_checkpoint(clip_g, dict(state), prefix=prefix)
    return {k: v.clone() for k, v in converted.items() if "position_ids" not in k}


def test_sdxl_kohya_lora_equals_diffusers(tmp_path):
    model = randomize_(LatentDiffusion(TINY_SDXL), seed=4).eval()
    reference = _diffusers_sdxl(model)
    gen = torch.Generator().manual_seed(2)
    unet = [
        (n, m)
        for n, m in reference.unet.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and "norm" not in n
    ]
    ldm_names = {}
    kinds = {n: type(m).__name__ for n, m in model.model.diffusion_model.named_modules()}
    for path, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            ldm_names[diffusers_unet_path(path, 1, kinds)] = path
    theirs, ours = {}, {}
    towers = (("lora_te1_", reference.text_encoder), ("lora_te2_", reference.text_encoder_2))
    texts = [
        (prefix + (n if n.startswith(TEXT_MODEL) else TEXT_MODEL + n).replace(".", "_"), m)
        for prefix, tower in towers
        for n, m in tower.named_modules()
        if isinstance(m, torch.nn.Linear) and "projection" not in n
    ]
    # diffusers reads the ADM MLP only under its original name (label_emb.0.0/0.2)
    layers = [
        (
            "lora_unet_" + (ldm_names[n] if "add_embedding" in n else n).replace(".", "_"),
            m,
            ldm_names[n],
        )
        for n, m in unet
    ]
    layers += [(key, m, None) for key, m in texts]
    for key, module, ldm in layers:
        down, up = _pair(module, 4, gen)
        alpha = torch.tensor(3.0)  # diffusers mishandles per-layer alphas of kohya files
        # kohya trains SDXL on the original U-Net: its files name U-Net layers that way
        our_key = "lora_unet_" + ldm.replace(".", "_") if ldm else key
        for state, name in ((theirs, key), (ours, our_key)):
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            state[f"{name}.alpha"] = alpha
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    save_file(ours, str(tmp_path / "ours.safetensors"))

    scale = 0.9
    reference.load_lora_weights(str(tmp_path / "theirs.safetensors"))
    reference.fuse_lora(lora_scale=scale)

    def clean(module):
        return {
            k.replace(".base_layer", ""): v.detach()
            for k, v in module.state_dict().items()
            if "lora_" not in k
        }

    base = {k: v.clone() for k, v in model.state_dict().items()}
    from ldm_cli.networks.lora import Networks

    networks = Networks(type("Pipe", (), {"model": model})())
    networks.apply([(tmp_path / "ours.safetensors", scale, scale)])
    state = model.state_dict()
    config = diffusers_unet_config(TINY_SDXL.unet, SDXL_TIME_EMBED)
    our_unet = convert_ldm_unet_checkpoint(dict(state), config)
    root = "conditioner.embedders.0.transformer.text_model."
    our_l = {k[len(root) :]: v for k, v in state.items() if k.startswith(root)}
    our_g = _bigg_state(reference.text_encoder_2, state)
    diffs = {
        "unet": _max_diff(our_unet, clean(reference.unet)),
        "clip_l": _max_diff(our_l, clean(reference.text_encoder)),
        "clip_g": _max_diff(our_g, clean(reference.text_encoder_2)),
    }
    print("SDXL max |ours - diffusers|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v < ATOL for v in diffs.values())
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert (state[in_proj] - base[in_proj]).abs().max() > 1e-3
    assert _max_diff(our_g, clean(reference.text_encoder_2)) < ATOL
    networks.restore()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_lora_hash_is_a1111s(tmp_path):
    from ldm_cli.networks.files import lora_hash

    tensors = {"lora_te_x.lora_down.weight": torch.ones(1, 2)}
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    assert lora_hash(plain) == addnet_hash(plain)
    # the header (metadata included) does not count: only the tensor data
    tagged = tmp_path / "tagged.safetensors"
    save_file(tensors, str(tagged), metadata={"ss_output_name": "tagged"})
    assert lora_hash(tagged) == lora_hash(plain)
    stored = tmp_path / "stored.safetensors"
    save_file(tensors, str(stored), metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert lora_hash(stored) == "abcdef012345"
    pickled = tmp_path / "old.pt"
    torch.save(tensors, pickled)
    assert lora_hash(pickled) == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]
