"""The layer-wise text probe behind the embedded model's choice of clip_skip 2."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.evaluation.text_probe import probe, probe_layers


def test_probe_fits_separable_classes_and_fails_on_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    separable = np.eye(3)[labels] + 0.1 * rng.standard_normal((400, 3))
    train = np.arange(400) < 300
    assert probe(separable, labels, 3, train, ~train) == 1.0
    assert probe(rng.standard_normal((400, 3)), labels, 3, train, ~train) < 0.6


@pytest.mark.skipif(not (WEIGHTS_DIR / DEFAULT_NAME).exists(), reason="no embedded model")
def test_the_embedded_text_encoders_first_layer_generalises_colour_best():
    from ldm_cli.pipeline.load import load

    rows = probe_layers(load(None, device="cpu").model.text_encoder, num_scenes=3000)
    assert [r["clip_skip"] for r in rows] == [3, 2, 1]
    embeddings, first, last = rows
    assert embeddings["colour_in"] < 0.3  # a shape token alone knows no colour
    assert first["colour_in"] > 0.95 and last["colour_in"] > 0.95
    assert first["colour_heldout"] > last["colour_heldout"] + 0.05
    assert first["shape_heldout"] > 0.9
