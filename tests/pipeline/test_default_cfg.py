"""A checkpoint may name its own guidance scale (`default_cfg` in its ldm_config): generate,
img2img, inpaint and eval use it when no --cfg is given, from the CLI and the Python API."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, one_thread_per_command, written  # noqa: F401

OWN = 3.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    own = random_checkpoint(TINY_SD1.with_(default_cfg=OWN), root / "own.safetensors", seed=1)
    plain = random_checkpoint(TINY_SD1, root / "plain.safetensors", seed=1)
    picture = root / "picture.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(picture)
    return {"own": own, "plain": plain, "picture": picture}


def _cfg(path) -> float:
    return parse_parameters(read_parameters(path)).cfg_scale


def test_generate_and_img2img_use_the_checkpoints_scale(models, tmp_path):
    common = ("--steps", "2", "--seed", "1", "-W", "32", "-H", "32")
    for model, extra, scale in [
        ("own", (), OWN),
        ("own", ("--cfg", "5"), 5.0),
        ("plain", (), 7.5),
    ]:
        out = tmp_path / f"{model}-{scale:g}"
        args = ("generate", "a cat", "--model", str(models[model]), *common, *extra)
        (path,) = written(ldm(*args, "--out", str(out / "gen")))
        assert _cfg(path) == scale
        args = ("img2img", str(models["picture"]), "a cat", "--model", str(models[model]))
        (path,) = written(ldm(*args, "--steps", "2", *extra, "--out", str(out / "i2i")))
        assert _cfg(path) == scale


def test_the_python_api_uses_it_too(models):
    from ldm_cli.evaluation.run_eval import evaluate
    from ldm_cli.pipeline.load import load

    pipe = load(models["own"], dtype="fp32")
    (image,) = pipe.generate("a cat", steps=1, seed=0, width=32, height=32)
    assert parse_parameters(image.info["parameters"]).cfg_scale == OWN
    (image,) = pipe.img2img(Image.open(models["picture"]), "a cat", steps=2, seed=0)
    assert parse_parameters(image.info["parameters"]).cfg_scale == OWN
    mask = Image.fromarray(np.full((32, 32), 255, np.uint8))
    (image,) = pipe.inpaint(Image.open(models["picture"]), mask, "a cat", steps=2, seed=0)
    assert parse_parameters(image.info["parameters"]).cfg_scale == OWN
    (image,) = pipe.generate("a cat", steps=1, cfg=2, seed=0, width=32, height=32)
    assert parse_parameters(image.info["parameters"]).cfg_scale == 2
    report = evaluate(pipe, num=2, steps=1, batch_size=2)
    assert report["settings"]["cfg"] == OWN
