"""LyCORIS LoHa, LoKr, LoCon with a Tucker middle and DoRA files in kohya naming, on seeded
random weights: the patched weights equal PEFT's LoHa/LoKr/DoRA layers built around the same
base weights (A1111's written formulas where PEFT has no such layer), the images equal
diffusers' StableDiffusionPipeline with those weights merged, the base weights come back bit
for bit, and broken layers are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.testing import random_checkpoint
from tests.networks.test_lora import (
    TEXT_MODEL,
    _lora_targets,
    _max_diff,
    _ours_in_diffusers_names,
    diffusers_sd1,
)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.tuners import loha as peft_loha  # noqa: E402
from peft.tuners import lokr as peft_lokr  # noqa: E402
from peft.tuners import lora as peft_lora  # noqa: E402
from peft.tuners.lokr.layer import factorization  # noqa: E402

RANK = 4
ALPHA = 2.0
ATOL = 1e-6
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=5)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return ldm_cli.load(checkpoint, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return diffusers_sd1(checkpoint)


@pytest.fixture
def fresh(pipe):
    pipe.networks.restore()
    pipe.networks.loras = []
    yield pipe
    pipe.networks.restore()
    pipe.networks.loras = []


# -- files made for the tests ---------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.3


def _lokr_parts(weight: torch.Tensor, form: str, gen: torch.Generator) -> dict:
    """LoKr parts: `form` is "<w1>-<w2>", w1 "whole" or "split", w2 also "tucker"."""
    out, inputs, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    (o1, o2), (i1, i2) = factorization(out), factorization(inputs)
    first, second = form.split("-")
    parts = {}
    if first == "whole":
        parts["lokr_w1"] = _randn(gen, o1, i1)
    else:
        parts |= {"lokr_w1_a": _randn(gen, o1, RANK), "lokr_w1_b": _randn(gen, RANK, i1)}
    if second == "whole":
        parts["lokr_w2"] = _randn(gen, o2, i2, *kernel)
    elif second == "tucker":
        parts["lokr_w2_a"] = _randn(gen, RANK, o2)
        parts["lokr_w2_b"] = _randn(gen, RANK, i2)
        parts["lokr_t2"] = _randn(gen, RANK, RANK, *kernel)
    else:
        flat = i2 * int(np.prod(kernel, dtype=int))
        parts |= {"lokr_w2_a": _randn(gen, o2, RANK), "lokr_w2_b": _randn(gen, RANK, flat)}
    return parts


def _dora_scale(weight: torch.Tensor, axis: str, gen: torch.Generator) -> torch.Tensor:
    """Magnitudes near the base weight's norms (LyCORIS starts from them): [out, 1(, 1, 1)]
    per output, [1, in(, 1, 1)] per input."""
    ones = [1] * (weight.ndim - 2)
    if axis == "out":
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, 1, *ones)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *ones)
    return norm * torch.exp(0.5 * torch.randn(norm.shape, generator=gen))


def layer_parts(kind: str, weight: torch.Tensor, index: int, gen: torch.Generator) -> dict:
    """One layer of a `kind` file for a base `weight`; 3x3 convolutions get the Tucker forms
    of the -tucker/-mid kinds, every fifth layer has no alpha (a scale of 1)."""
    out, inputs, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    spatial = kernel not in ((), (1, 1))
    flat = weight[0].numel()
    parts: dict[str, torch.Tensor] = {}
    if kind.startswith("loha"):
        for n in ("1", "2"):
            if kind == "loha-tucker" and spatial:
                parts[f"hada_w{n}_a"] = _randn(gen, RANK, out)
                parts[f"hada_w{n}_b"] = _randn(gen, RANK, inputs)
                parts[f"hada_t{n}"] = _randn(gen, RANK, RANK, *kernel)
            else:
                parts[f"hada_w{n}_a"] = _randn(gen, out, RANK)
                parts[f"hada_w{n}_b"] = _randn(gen, RANK, flat)
    elif kind.startswith("lokr"):
        forms = ["whole-whole", "split-split", "whole-split", "split-whole"]
        form = "whole-whole" if kind == "lokr-whole" else forms[index % 4]
        if kind == "lokr-tucker" and spatial:
            form = ("whole-tucker", "split-tucker")[index % 2]
        parts = _lokr_parts(weight, form, gen)
    elif kind == "locon-mid" and spatial:
        parts["lora_down.weight"] = _randn(gen, RANK, inputs, 1, 1)
        parts["lora_mid.weight"] = _randn(gen, RANK, RANK, *kernel)
        parts["lora_up.weight"] = _randn(gen, out, RANK, 1, 1)
    else:  # LoRA / LoCon (3x3 down, 1x1 up), with DoRA's dora_scale for the dora- kinds
        parts["lora_down.weight"] = _randn(gen, RANK, inputs, *kernel)
        parts["lora_up.weight"] = _randn(gen, out, RANK, *([1] * len(kernel)))
        if kind.startswith("dora"):
            parts["dora_scale"] = _dora_scale(weight, kind.removeprefix("dora-"), gen)
    if index % 5 != 4:
        parts["alpha"] = torch.tensor(ALPHA)
    return parts


def write_lycoris(path: Path, pipe_d, kind: str, seed: int = 0, gain: float = 1.0) -> list[tuple]:
    """A kohya-named `kind` file over every U-Net and text-encoder layer of diffusers'
    pipeline, its low-rank parts times `gain`; returns (module of pipe_d, its parts) for each
    layer."""
    gen = torch.Generator().manual_seed(seed)
    unet, text = _lora_targets(pipe_d)
    keys = [("lora_unet_" + name.replace(".", "_"), m) for name, m in unet]
    keys += [("lora_te_" + (TEXT_MODEL + name).replace(".", "_"), m) for name, m in text]
    state, layers = {}, []
    for index, (key, module) in enumerate(keys):
        parts = layer_parts(kind, module.weight.detach(), index, gen)
        parts = {k: v if k in ("alpha", "dora_scale") else v * gain for k, v in parts.items()}
        state.update({f"{key}.{part}": tensor for part, tensor in parts.items()})
        layers.append((module, parts))
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return layers


# -- the reference deltas -------------------------------------------------------------------


def _base_copy(module: nn.Module) -> nn.Module:
    weight = module.weight.detach().clone()
    if weight.ndim == 2:
        copy = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        copy = nn.Conv2d(weight.shape[1], weight.shape[0], module.kernel_size, bias=False)
    copy.weight.data = weight
    return copy


def _scale(parts: dict, rank: int | None) -> float:
    return ALPHA / rank if "alpha" in parts and rank is not None else 1.0


def _with_parts(layer: nn.Module, names: tuple[str, ...], parts: dict) -> nn.Module:
    """A PEFT LyCORIS layer holding exactly our tensors as its "default" adapter."""
    for name in names:
        store = getattr(layer, name)
        store.clear()
        if name in parts:
            store["default"] = nn.Parameter(parts[name].clone())
    return layer


def peft_loha_delta(module: nn.Module, parts: dict) -> torch.Tensor:
    base = _base_copy(module)
    tucker = "hada_t1" in parts
    config = peft_loha.LoHaConfig(r=RANK, alpha=ALPHA, use_effective_conv2d=tucker)
    cls = peft_loha.layer.Linear if base.weight.ndim == 2 else peft_loha.layer.Conv2d
    alpha = ALPHA if "alpha" in parts else RANK  # PEFT's alpha / r: 1 without an alpha
    layer = cls(base, "default", config=config, r=RANK, alpha=alpha)
    return _with_parts(layer, LOHA_PARTS, parts).get_delta_weight("default").detach()


def peft_lokr_delta(module: nn.Module, parts: dict) -> torch.Tensor:
    base = _base_copy(module)
    config = peft_lokr.LoKrConfig(r=RANK, alpha=ALPHA, use_effective_conv2d="lokr_t2" in parts)
    cls = peft_lokr.layer.Linear if base.weight.ndim == 2 else peft_lokr.layer.Conv2d
    layer = _with_parts(cls(base, "default", config=config, r=RANK, alpha=ALPHA), LOKR_PARTS, parts)
    # PEFT scales every LoKr by alpha / r; A1111 (and LyCORIS) only a split one, by alpha over
    # the rank of w2 (else of w1), and a LoKr of two whole factors by 1
    split = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
    layer.scaling["default"] = _scale(parts, None if split is None else split.shape[0])
    return layer.get_delta_weight("default").detach()


def peft_lora_merged(module: nn.Module, parts: dict) -> torch.Tensor:
    """PEFT's LoRA (with DoRA's magnitudes where the file has them) merged into a copy."""
    base = _base_copy(module)
    dora = "dora_scale" in parts
    alpha = ALPHA if "alpha" in parts else RANK
    config = peft_lora.LoraConfig(r=RANK, lora_alpha=alpha, use_dora=dora)
    cls = peft_lora.layer.Linear if base.weight.ndim == 2 else peft_lora.layer.Conv2d
    layer = cls(base, "default", config=config, r=RANK, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(parts["lora_down.weight"])
        layer.lora_B["default"].weight.copy_(parts["lora_up.weight"])
        if dora:
            magnitude = layer.lora_magnitude_vector["default"].weight  # [out], conv [1, out, 1, 1]
            magnitude.copy_(parts["dora_scale"].reshape(magnitude.shape))
        layer.merge(adapter_names=["default"])
    return layer.get_base_layer().weight.detach()


def a1111_mid_delta(parts: dict) -> torch.Tensor:
    """A1111's rebuild_cp_decomposition: up [out, r], down [r, in], mid [r, r, kh, kw]."""
    up = parts["lora_up.weight"].flatten(1)
    down = parts["lora_down.weight"].flatten(1)
    delta = torch.einsum("n m k l, i n, m j -> i j k l", parts["lora_mid.weight"], up, down)
    return delta * _scale(parts, down.shape[0])


def a1111_dora_in_delta(weight: torch.Tensor, parts: dict) -> torch.Tensor:
    """A1111's apply_weight_decompose: the norm of each input channel of W + d."""
    up, down = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"].flatten(1)
    merged = weight + (up @ down).reshape(weight.shape) * _scale(parts, down.shape[0])
    inputs = merged.shape[1]
    norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(inputs, *[1] * (merged.ndim - 1)).transpose(0, 1)
    return merged * (parts["dora_scale"] / norm) - weight


def reference_delta(module: nn.Module, parts: dict) -> torch.Tensor:
    """The change of `module`'s weight at multiplier 1 (A1111 multiplies it)."""
    weight = module.weight.detach()
    if "hada_w1_a" in parts:
        return peft_loha_delta(module, parts)
    if any(name in parts for name in LOKR_PARTS):
        return peft_lokr_delta(module, parts)
    if "lora_mid.weight" in parts:
        return a1111_mid_delta(parts)
    dora = parts.get("dora_scale")
    if dora is not None and dora.shape[0] == 1:
        return a1111_dora_in_delta(weight, parts)
    return peft_lora_merged(module, parts) - weight


def merged_reference(pipe_d, layers: list[tuple], multiplier: float) -> tuple[dict, dict]:
    """diffusers' U-Net and text encoder states with every layer's reference delta added."""
    changed = {
        id(module): module.weight.detach() + multiplier * reference_delta(module, parts)
        for module, parts in layers
    }
    states = []
    for part in (pipe_d.unet, pipe_d.text_encoder):
        state = {k: v.detach().clone() for k, v in part.state_dict().items()}
        for name, module in part.named_modules():
            if id(module) in changed:
                state[name + ".weight"] = changed[id(module)]
        states.append(state)
    return states[0], states[1]


# -- patched weights ------------------------------------------------------------------------

KINDS = [
    "loha",
    "loha-tucker",
    "lokr-whole",
    "lokr-split",
    "lokr-tucker",
    "locon-mid",
    "dora-out",
    "dora-in",
]


@pytest.mark.parametrize("kind", KINDS)
def test_patched_weights_equal_the_reference(fresh, reference, tmp_path, kind):
    pipe = fresh
    path = tmp_path / f"{kind}.safetensors"
    layers = write_lycoris(path, reference, kind, seed=KINDS.index(kind))
    multiplier = 0.7
    their_unet, their_text = merged_reference(reference, layers, multiplier)
    pristine = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base_unet, base_text = _ours_in_diffusers_names(pipe)

    pipe.networks.apply([(path, multiplier, multiplier)])
    our_unet, our_text = _ours_in_diffusers_names(pipe)
    unet_diff, text_diff = _max_diff(our_unet, their_unet), _max_diff(our_text, their_text)
    print(f"{kind}: max |ours - reference| U-Net {unet_diff:.2e}, text encoder {text_diff:.2e}")
    assert unet_diff < ATOL and text_diff < ATOL
    # every U-Net layer of the file changed (the comparison is not of untouched weights)
    changed = [k for k in our_unet if (our_unet[k] - base_unet[k]).abs().max() > 1e-3]
    assert len(changed) == len(_lora_targets(reference)[0])
    assert any((our_text[k] - base_text[k]).abs().max() > 1e-3 for k in our_text)

    pipe.networks.restore()
    assert all(torch.equal(v, pristine[k]) for k, v in pipe.model.state_dict().items())


def test_dora_after_another_network_normalises_their_sum(fresh, reference, tmp_path):
    """A1111 patches networks one after another: a DoRA layer sees the weight that the
    networks before it made."""
    pipe = fresh
    first, second = tmp_path / "loha.safetensors", tmp_path / "dora.safetensors"
    write_lycoris(first, reference, "loha", seed=11)
    layers = write_lycoris(second, reference, "dora-in", seed=12)
    name = "encoder.layers.0.mlp.fc1"  # 37x32: its inputs and outputs differ
    module = dict(reference.text_encoder.named_modules())[name]
    (parts,) = [p for m, p in layers if m is module]
    ours = f"cond_stage_model.transformer.{TEXT_MODEL}{name}.weight"

    pipe.networks.apply([(first, 0.5, 0.5)])
    after_first = pipe.model.state_dict()[ours].clone()
    pipe.networks.apply([(first, 0.5, 0.5), (second, 0.9, 0.9)])
    expected = after_first + 0.9 * a1111_dora_in_delta(after_first, parts)
    assert (pipe.model.state_dict()[ours] - expected).abs().max() < ATOL


# -- images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_reference(reference, checkpoint, reference_dir):
    """diffusers' pipeline around `reference`'s U-Net and text encoder, with the checkpoint's
    VAE and SD 1.5's tokenizer and scheduler config (as in test_pipeline_parity)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from tests.reference_configs import diffusers_vae_config

    config = diffusers_vae_config(TINY_SD1.vae)
    vae = diffusers.AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(checkpoint)), config))
    sd15 = Path(reference_dir) / "sd15"
    scheduler = json.loads((sd15 / "scheduler" / "scheduler_config.json").read_text())
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=reference.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(sd15 / "tokenizer")),
        unet=reference.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = scheduler
    return pipe


def _diffusers_image(pipe_d, unet: dict, text: dict) -> np.ndarray:
    """The Euler image of diffusers' pipeline with these weights; its own come back after."""
    from tests.pipeline.test_pipeline_parity import reference_image

    parts = (pipe_d.unet, pipe_d.text_encoder)
    saved = [{k: v.clone() for k, v in part.state_dict().items()} for part in parts]
    try:
        for part, state in zip(parts, (unet, text), strict=True):
            part.load_state_dict(state)
        scheduler = diffusers.EulerDiscreteScheduler
        return reference_image(pipe_d, scheduler, timestep_spacing="linspace")
    finally:
        for part, state in zip(parts, saved, strict=True):
            part.load_state_dict(state)


@pytest.fixture(scope="module")
def plain_image(reference, image_reference) -> np.ndarray:
    return _diffusers_image(image_reference, *_base_states(reference))


def _base_states(pipe_d) -> tuple[dict, dict]:
    return pipe_d.unet.state_dict(), pipe_d.text_encoder.state_dict()


@pytest.mark.parametrize("kind", ["loha-tucker", "lokr-tucker", "dora-out"])
def test_image_equals_diffusers_with_the_merged_weights(
    fresh, reference, image_reference, plain_image, tmp_path, kind
):
    from tests.pipeline.test_pipeline_parity import assert_same_image, our_image

    pipe = fresh
    path = tmp_path / f"{kind}.safetensors"
    # twice the parts of the weight tests: the networks show in these tiny models' images
    layers = write_lycoris(path, reference, kind, seed=20 + KINDS.index(kind), gain=2.0)
    multiplier = 0.8
    expected = _diffusers_image(image_reference, *merged_reference(reference, layers, multiplier))
    pristine = {k: v.clone() for k, v in pipe.model.state_dict().items()}

    pipe.networks.add_lora(path, multiplier)
    image = our_image(pipe, "euler", "normal")
    pipe.networks.clear_loras()
    assert_same_image(image, expected)
    assert all(torch.equal(v, pristine[k]) for k, v in pipe.model.state_dict().items())
    # the network shows: without it, the image is farther from this one than the tolerance
    assert np.abs(plain_image.astype(int) - expected.astype(int)).max() > 10


def test_a_render_without_the_network_restores_the_base_weights(fresh, reference, tmp_path):
    pipe = fresh
    folder = tmp_path / "Lora"
    folder.mkdir()
    write_lycoris(folder / "shade.safetensors", reference, "dora-in", seed=30)
    pipe.networks.lora_dir = folder
    pristine = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    options = {"steps": 1, "seed": 3, "sampler": "euler", "width": 64, "height": 64}
    pipe.generate("a red circle <lora:shade:0.6>", **options)
    assert any(not torch.equal(v, pristine[k]) for k, v in pipe.model.state_dict().items())
    pipe.generate("a red circle", **options)
    assert all(torch.equal(v, pristine[k]) for k, v in pipe.model.state_dict().items())


# -- bad input ------------------------------------------------------------------------------

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32x32


def _loha(**changes) -> dict:
    gen = torch.Generator().manual_seed(0)
    parts = {
        "hada_w1_a": _randn(gen, 32, RANK),
        "hada_w1_b": _randn(gen, RANK, 32),
        "hada_w2_a": _randn(gen, 32, RANK),
        "hada_w2_b": _randn(gen, RANK, 32),
    }
    parts.update(changes)
    return {k: v for k, v in parts.items() if v is not None}


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            _loha(hada_w2_b=None),
            f"LoRA bad.safetensors: layer {TO_Q} is a LyCORIS LoHa layer with no hada_w2_b",
        ),
        (
            _loha(hada_w1_b=torch.zeros(3, 32)),
            rf"layer {TO_Q} has a hada_w1_a \(32, 4\), hada_w1_b \(3, 32\) that do not fit",
        ),
        (
            _loha(hada_w2_a=torch.zeros(16, RANK)),
            f"layer {TO_Q} has LoHa factors of 32x32 and 16x32, which differ",
        ),
        (
            {"lokr_w1": torch.zeros(4, 4), "lokr_w2_a": torch.zeros(8, 2)},
            f"layer {TO_Q} is a LyCORIS LoKr layer with no lokr_w2 or lokr_w2_b",
        ),
        (
            {**_loha(), "lora_down.weight": torch.zeros(RANK, 32)},
            f"layer {TO_Q} mixes LoHa and LoRA weights",
        ),
        (
            {"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(8, 4)},
            r"does not fit this model: layer .*attn1.to_q.weight is 32x32 here, the LoRA "
            "changes 32x16",
        ),
        (
            {**_loha(), "dora_scale": torch.ones(5, 1)},
            r"layer .*attn1.to_q.weight has a dora_scale \(5, 1\) that fits neither the 32 "
            "inputs nor the 32 outputs",
        ),
        ({"diff": torch.zeros(32, 32)}, r"LyCORIS full weight differences \(\.diff\)"),
        ({"w_norm": torch.zeros(32)}, "LyCORIS norm"),
    ],
    ids=[
        "loha-missing-part",
        "loha-inner-dims",
        "loha-factors-differ",
        "lokr-missing-part",
        "mixed-kinds",
        "lokr-wrong-size",
        "dora-scale-shape",
        "diff",
        "norm",
    ],
)
def test_broken_layers_are_one_line_errors(fresh, tmp_path, parts, message):
    path = tmp_path / "bad.safetensors"
    save_file({f"{TO_Q}.{part}": tensor for part, tensor in parts.items()}, str(path))
    with pytest.raises(UserError, match=message) as error:
        fresh.networks.apply([(path, 1.0, 1.0)])
    assert "\n" not in str(error.value)
