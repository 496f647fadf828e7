"""LoRAs for FLUX.1 and SD3 (ldm_cli.networks.flow_keys) against diffusers' `load_lora_weights`.

The tiny all-in-one models and diffusers' pipelines of the same weights are those of
tests/pipeline/test_flow_pipeline.py. A seeded diffusers/PEFT LoRA over every transformer
layer diffusers names (q, k, v and FLUX's single-block mlp among them: rows of our fused
weights) and the CLIP text encoders must give diffusers' image; the same changes written as a
kohya/sd-scripts file (our names, fused: q, k, v in one block-diagonal layer, alpha != rank)
must give the same image again. diffusers loads LoRAs unfused (W x + B A x), we patch the
weights: the images agree to rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_cli.core.errors import UserError
from ldm_cli.networks.files import lora_hash
from ldm_cli.networks.flow_keys import TRANSFORMER_ROOT, flow_layer_table
from ldm_cli.networks.lora import swap_halves

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
from tests.flow_helpers import flow_tokenizers  # noqa: E402
from tests.pipeline.test_flow_pipeline import (  # noqa: E402
    NEGATIVES,
    OURS,
    PROMPT,
    SEED,
    SIZE,
    STEPS,
    build_pair,
    max_difference,
    pixels,
)

NAMES = ["flux-dev", "sd35"]
RANK = 4
STRENGTH = 0.25  # each change's std, in units of its weight's (1 / sqrt(fan_in))
# diffusers/PEFT lora_alpha by component (scale alpha / r = 2 and 1)
ALPHAS = {"transformer": 2.0 * RANK, "text_encoder": float(RANK), "text_encoder_2": float(RANK)}
# the text encoders diffusers' pipelines load LoRAs into: FLUX's CLIP-L; SD3's CLIP-L and G
PEFT_TEXT = {"flux-dev": ("text_encoder.",), "sd35": ("text_encoder.", "text_encoder_2.")}
KOHYA_TEXT = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pairs(reference_dir, tmp_path_factory):
    """`pairs(name)`: the model's Pair (ours and diffusers'), with its LoRA files."""
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            pair = build_pair(name, folder, reference_dir, flow_tokenizers(reference_dir))
            table = flow_layer_table(pair.ours.model)
            peft = write_peft(folder / "Lora" / "peft_style.safetensors", pair.ours, name)
            kohya = write_kohya(folder / "kohya_style.safetensors", pair.ours, table, peft)
            built[name] = SimpleNamespace(pair=pair, table=table, peft=peft, kohya=kohya)
        return built[name]

    return get


@pytest.fixture
def clean():
    """Each test's pipelines leave with no LoRA applied or loaded."""
    used = []
    yield used.append
    for pair in used:
        pair.ours.networks.clear_loras()
        pair.theirs.unload_lora_weights()


# -- LoRA files ----------------------------------------------------------------------------------


def write_peft(path: Path, pipe, name: str) -> Path:
    """A diffusers/PEFT file over every transformer layer diffusers names and the pipeline's
    CLIP layers (``text_encoder.text_model...``), with diffusers' adapter metadata."""
    table = flow_layer_table(pipe.model)
    params = dict(pipe.model.named_parameters())
    gen = torch.Generator().manual_seed(5)
    wanted = ("transformer.", *PEFT_TEXT[name])
    state, targets = {}, {}
    for layer, target in table.items():
        if not layer.startswith(wanted):
            continue
        weight = params[target.param]
        rows = target.rows or (0, weight.shape[0])
        fan_in = weight[0].numel()
        size = (STRENGTH / fan_in**0.5 / RANK**0.5) ** 0.5  # std of B @ A: STRENGTH/sqrt(fan_in)
        down = torch.randn(RANK, *weight.shape[1:], generator=gen) * size
        up = torch.randn(rows[1] - rows[0], RANK, *[1] * (weight.ndim - 2), generator=gen) * size
        state[f"{layer}.lora_A.weight"] = down
        state[f"{layer}.lora_B.weight"] = up
        component, _, module = layer.partition(".")
        targets.setdefault(component, set()).add(module)
    metadata = {}
    for component, modules in targets.items():
        # PEFT matches target modules by suffix: the CLIPs' by their last part, since
        # transformers 5's CLIPTextModel has no text_model level
        if component != "transformer":
            modules = {m.rsplit(".", 1)[-1] for m in modules}
        metadata[f"{component}.r"] = RANK
        metadata[f"{component}.lora_alpha"] = ALPHAS[component]
        metadata[f"{component}.target_modules"] = sorted(modules)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def kohya_name(param: str) -> str:
    """sd-scripts' name of one of our parameters: the original path, ``.`` made ``_``."""
    path = param.removesuffix(".weight")
    if path.startswith(TRANSFORMER_ROOT):
        return "lora_unet_" + path[len(TRANSFORMER_ROOT) :].replace(".", "_")
    _, tower, _, inner = path.split(".", 3)  # text_encoders.<tower>.transformer.<path>
    return KOHYA_TEXT[tower] + inner.replace(".", "_")


def write_kohya(path: Path, pipe, table, peft: Path, keep=lambda name: True) -> Path:
    """The changes of the PEFT file as sd-scripts writes them: one layer per weight of ours
    (q, k, v and mlp rows of a fused weight as one block-diagonal layer), alpha = rank / 2
    (up doubled to keep each change); `keep(kohya_name)` chooses the layers written."""
    state = load_file(str(peft))
    metadata = json.loads(_metadata(peft)["lora_adapter_metadata"])
    shapes = {k: v.shape for k, v in pipe.model.state_dict().items()}
    fused: dict[str, list] = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        target = table[layer]
        component = layer.partition(".")[0]
        scale = metadata[f"{component}.lora_alpha"] / metadata[f"{component}.r"]
        up = state[f"{layer}.lora_B.weight"] * scale
        if target.swapped:
            up = swap_halves(up)
        fused.setdefault(target.param, []).append((target.rows, down, up))
    out = {}
    for param, parts in fused.items():
        name = kohya_name(param)
        if not keep(name):
            continue
        parts.sort(key=lambda part: part[0][0] if part[0] else 0)
        down = torch.cat([d for _, d, _ in parts])
        rank = down.shape[0]
        if len(parts) == 1 and parts[0][0] is None:
            up = parts[0][2]
        else:
            up = torch.zeros(shapes[param][0], rank)
            column = 0
            for (start, stop), d, u in parts:
                up[start:stop, column : column + d.shape[0]] = u
                column += d.shape[0]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * 2
        out[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return path


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


# -- rendering -----------------------------------------------------------------------------------


def ours(pair, prompt: str = PROMPT):
    (image,) = pair.ours.generate(
        prompt,
        NEGATIVES[pair.name],
        seed=SEED,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        sampler="euler",
        **OURS[pair.name],
    )
    return image


def theirs(pair, lora: Path):
    pair.theirs.load_lora_weights(str(lora))
    try:
        return pair.reference([SEED])
    finally:
        pair.theirs.unload_lora_weights()


# -- the names -----------------------------------------------------------------------------------


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """A module of a diffusers/transformers model by a LoRA file's path (transformers 5's
    CLIPTextModel has no text_model level)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_names_hold_diffusers_weights(pairs, name):
    """Every diffusers name of the table is the diffusers layer holding those weights (rows;
    norm_out's and SD3's last norm1_context's with their halves exchanged), and every layer of
    diffusers' transformer has one."""
    loaded = pairs(name)
    pipe, state = loaded.pair.theirs, loaded.pair.ours.model.state_dict()
    roots = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    roots["text_encoder_2"] = pipe.text_encoder_2
    if name == "sd35":
        roots["text_encoder_3"] = pipe.text_encoder_3
    named = set()
    for layer, target in loaded.table.items():
        component, _, path = layer.partition(".")
        if component not in roots:
            continue
        expected = state[target.param]
        if target.rows is not None:
            expected = expected[target.rows[0] : target.rows[1]]
        if target.swapped:
            expected = swap_halves(expected)
        assert torch.equal(_module(roots[component], path).weight, expected), layer
        if component == "transformer":
            named.add(path)
    layers = {
        path
        for path, module in pipe.transformer.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }
    assert layers == named
    swapped = {k.partition(".")[2] for k, t in loaded.table.items() if t.swapped}
    expected = {"norm_out.linear"}
    if name == "sd35":
        last = len(pipe.transformer.transformer_blocks) - 1
        expected.add(f"transformer_blocks.{last}.norm1_context.linear")
    assert {k for k in swapped if k in layers} == expected


# -- images against diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_peft_lora_gives_diffusers_image(pairs, clean, name):
    """FLUX by a prompt tag (recorded in the PNG), SD3 by --lora; LoRA'd CLIPs included."""
    loaded = pairs(name)
    pair = loaded.pair
    clean(pair)
    plain = pixels([ours(pair)])
    if name == "flux-dev":
        pair.ours.networks.lora_dir = loaded.peft.parent
        image = ours(pair, "<lora:peft_style:1>" + PROMPT)
        hashes = image.info["parameters"]
        assert f'Lora hashes: "peft_style: {lora_hash(loaded.peft)}"' in hashes
    else:
        pair.ours.networks.add_lora(f"{loaded.peft}:1")
        image = ours(pair)
    styled = pixels([image])
    assert abs(styled - plain).mean() > 0.02  # the LoRA changes the image
    assert max_difference(f"{name} PEFT", styled, theirs(pair, loaded.peft)) <= 2


@pytest.mark.parametrize("name", NAMES)
def test_kohya_file_gives_the_peft_image(pairs, clean, name, tmp_path):
    loaded = pairs(name)
    pair = loaded.pair
    clean(pair)
    pair.ours.networks.add_lora(f"{loaded.peft}:1")
    peft = pixels([ours(pair)])
    pair.ours.networks.clear_loras()
    pair.ours.networks.add_lora(f"{loaded.kohya}:1")
    assert max_difference(f"{name} kohya", pixels([ours(pair)]), peft) <= 1
    if name != "flux-dev":
        return  # diffusers reads no kohya SD3 files
    # diffusers (0.42) splits linear1 as FLUX.1's 3072-wide rows, and drops the embedders' and
    # the final layer's (written without its transformer. prefix): a file without them
    blocks = tmp_path / "blocks.safetensors"
    write_kohya(
        blocks,
        pair.ours,
        loaded.table,
        loaded.peft,
        keep=lambda n: "_blocks_" in n and "linear1" not in n or n.startswith("lora_te"),
    )
    pair.ours.networks.clear_loras()
    pair.ours.networks.add_lora(f"{blocks}:1")
    image = pixels([ours(pair)])
    assert max_difference(f"{name} kohya, diffusers", image, theirs(pair, blocks)) <= 2


# -- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_row_blocks_are_patched_and_restored_bit_exact(pairs, clean, name):
    loaded = pairs(name)
    pipe = loaded.pair.ours
    clean(loaded.pair)
    base = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    state = load_file(str(loaded.peft))
    fused = "single_blocks.0.linear1" if name == "flux-dev" else "joint_blocks.0.x_block.attn2.qkv"
    layers = [k for k, t in loaded.table.items() if t.param == f"{TRANSFORMER_ROOT}{fused}.weight"]
    layers = [k for k in layers if f"{k}.lora_A.weight" in state]
    assert len(layers) == (4 if name == "flux-dev" else 3)

    pipe.networks.apply([(loaded.peft, 1.0, 1.0)])
    patched = pipe.model.state_dict()
    for layer in layers:
        start, stop = loaded.table[layer].rows
        change = state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"] * 2  # alpha/r
        key = f"{TRANSFORMER_ROOT}{fused}.weight"
        torch.testing.assert_close(patched[key][start:stop] - base[key][start:stop], change)
    changed = [k for k in base if not torch.equal(patched[k], base[k])]
    assert any(k.startswith("text_encoders.clip_l.") for k in changed)

    pipe.networks.apply([(loaded.kohya, 0.5, 1.0), (loaded.peft, 1.0, -1.0)])
    pipe.networks.restore()
    restored = pipe.model.state_dict()
    assert all(torch.equal(restored[k], base[k]) for k in base)
    original = load_file(str(loaded.pair.path))
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_an_sd15_lora_on_flux_is_a_one_line_error(pairs, clean, tmp_path):
    """Its CLIP layers' names are FLUX's CLIP-L's (lora_te_, 768 wide in both): alone they
    would apply, its U-Net's skipped."""
    pair = pairs("flux-dev").pair
    clean(pair)
    width = pair.ours.config.clip_l.hidden_size
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (width, width),
    }
    path = tmp_path / "sd15_style.safetensors"
    state = {}
    for layer, (out, into) in layers.items():
        state[f"{layer}.lora_down.weight"] = torch.ones(RANK, into)
        state[f"{layer}.lora_up.weight"] = torch.ones(out, RANK)
    save_file(state, str(path))
    base = {k: v.clone() for k, v in pair.ours.model.state_dict().items()}
    pair.ours.networks.add_lora(f"{path}:1")
    with pytest.raises(UserError) as error:
        ours(pair)
    message = str(error.value)
    assert "\n" not in message
    assert "sd15_style.safetensors is not for flux-dev models" in message
    assert "lora_unet_down_blocks_0_attentions_0" in message
    state = pair.ours.model.state_dict()
    assert all(torch.equal(state[k], base[k]) for k in base)

    unet_only = tmp_path / "sd15_unet.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "lora_unet" in k}, str(unet_only))
    pair.ours.networks.clear_loras()
    pair.ours.networks.add_lora(f"{unet_only}:1")
    with pytest.raises(UserError, match=r"^LoRA sd15_unet.safetensors matches no layer[^\n]*$"):
        ours(pair)


def write_xlabs(path: Path, pipe, table) -> Path:
    """An XLabs FLUX LoRA (``double_blocks.N.processor.qkv_lora1.down.weight``, ...) over every
    layer XLabs names, no alpha (scale 1)."""
    params = dict(pipe.model.named_parameters())
    gen = torch.Generator().manual_seed(11)
    state = {}
    for layer, target in table.items():
        if ".processor." not in layer or layer.startswith("diffusion_model."):
            continue
        weight = params[target.param]
        rows = target.rows or (0, weight.shape[0])
        size = (STRENGTH / weight.shape[1] ** 0.5 / RANK**0.5) ** 0.5
        state[f"{layer}.down.weight"] = torch.randn(RANK, weight.shape[1], generator=gen) * size
        state[f"{layer}.up.weight"] = torch.randn(rows[1] - rows[0], RANK, generator=gen) * size
    save_file(state, str(path))
    return path


def test_xlabs_flux_lora_gives_diffusers_image(pairs, clean, tmp_path):
    """XLabs' processor names: q, k, v of both streams, their projections, and the single
    blocks' q, k, v rows of linear1 and linear2, as diffusers converts them."""
    loaded = pairs("flux-dev")
    pair = loaded.pair
    clean(pair)
    lora = write_xlabs(tmp_path / "xlabs.safetensors", pair.ours, loaded.table)
    kinds = {k.split(".processor.")[1].split(".")[0] for k in load_file(str(lora))}
    assert kinds == {"qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2", "qkv_lora", "proj_lora"}
    plain = pixels([ours(pair)])
    pair.ours.networks.add_lora(f"{lora}:1")
    styled = pixels([ours(pair)])
    assert abs(styled - plain).mean() > 0.02
    assert max_difference("flux-dev XLabs", styled, theirs(pair, lora)) <= 2
