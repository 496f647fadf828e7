"""How compositional a shapes model's text features are, layer by layer.

`python -m ldm_cli.evaluation.text_probe [MODEL]` fits ridge-regression probes on the text
encoder's per-token features (each layer's output through the final layer norm, as the U-Net
would read it with that clip_skip) of captions whose objects are in distribution, and tests
them on objects of the colour-shape pairs held out of training: from an object's shape token,
its colour and its shape. A layer whose held-out accuracy stays near its in-distribution one
encodes colour and shape separably, which is what a U-Net needs to draw a pair it never saw.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ldm_cli.data.shapes import COLOURS, SHAPES, caption, is_heldout, random_scene

RIDGE = 1e-2
COLOUR_NAMES = list(COLOURS)


def probe(features, labels, classes, train, test) -> float:
    """Accuracy on ``test`` of a one-vs-all ridge regression fitted on ``train``."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    y = np.eye(classes)[labels]
    gram = x[train].T @ x[train] + RIDGE * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x[train].T @ y[train])
    return float(((x[test] @ weights).argmax(1) == labels[test]).mean())


@torch.no_grad()
def probe_layers(text_encoder, num_scenes: int = 6000, seed: int = 5) -> list[dict]:
    """Per layer (0 = token embeddings, last = the encoder's output): probe accuracies."""
    from ldm_cli.models.clip_tower import tokenize

    pad = text_encoder.cfg.pad_token_id
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, allow_heldout=True) for _ in range(num_scenes)]
    tokens = tokenize([caption(s) for s in scenes], pad)
    shape_ids = {int(tokenize([shape], pad)[0, 1]) for shape in SHAPES}
    model = text_encoder.text_model
    hidden = model(tokens, output_hidden_states=True).hidden_states
    rows = []  # (scene, shape-token position, colour, shape, held out)
    for i, scene in enumerate(scenes):
        positions = [j for j, t in enumerate(tokens[i].tolist()) if t in shape_ids]
        for obj, j in zip(scene.objects, positions, strict=True):
            colour, shape = COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape)
            rows.append((i, j, colour, shape, is_heldout(obj)))
    index = np.array(rows)
    heldout = index[:, 4].astype(bool)
    report = []
    for layer, states in enumerate(hidden):
        features = model.final_layer_norm(states)[index[:, 0], index[:, 1]].numpy()
        report.append(
            {
                "layer": layer,
                "clip_skip": len(hidden) - layer,
                **{
                    f"{name}_{split}": probe(features, index[:, col], n, ~heldout, test)
                    for name, col, n in (("colour", 2, len(COLOURS)), ("shape", 3, len(SHAPES)))
                    for split, test in (("in", ~heldout), ("heldout", heldout))
                },
            }
        )
    return report


def main() -> None:
    from ldm_cli.pipeline.load import load

    pipe = load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu", dtype="fp32")
    print("layer  clip_skip  colour in / held-out  shape in / held-out")
    for row in probe_layers(pipe.model.text_encoder):
        print(
            f"{row['layer']:>5}  {row['clip_skip']:>9}  {row['colour_in']:>9.1%} / "
            f"{row['colour_heldout']:.1%}  {row['shape_in']:>8.1%} / {row['shape_heldout']:.1%}"
        )


if __name__ == "__main__":
    main()
