"""The embedded model with its canny ControlNet: a rough sketch decides where the shapes go,
the prompt what they are and their colours. It gets both right in about half the images (it
can swap the shapes or colours of two objects: docs/controlnet.md), hence four seeds.

.venv/bin/python examples/controlnet.py   # writes outputs/controlnet/sketch.png, controlnet-*.png

The same from the shell:
    ldm generate "a large red square in the bottom left and a large blue circle in the top \
right, on a yellow background" --control weights/ldm-shapes-canny.safetensors \
        --control-image sketch.png --preprocess canny --seed 1
"""

from pathlib import Path

from PIL import Image, ImageDraw

import ldm_cli
from ldm_cli.core.pngmeta import write_png

OUT = Path("outputs/controlnet")
CONTROLNET = Path(__file__).resolve().parents[1] / "weights" / "ldm-shapes-canny.safetensors"
OUT.mkdir(parents=True, exist_ok=True)

# A sketch as from any paint program: grey blobs on white, at the model's 64x64.
sketch = Image.new("RGB", (64, 64), "white")
draw = ImageDraw.Draw(sketch)
draw.rectangle((6, 38, 24, 56), fill="grey")  # bottom left
draw.ellipse((38, 8, 56, 26), fill="grey")  # top right
sketch.save(OUT / "sketch.png")

pipe = ldm_cli.load()  # the embedded model
control = ldm_cli.Control(CONTROLNET, OUT / "sketch.png", preprocess="canny")
prompt = (
    "a large red square in the bottom left and a large blue circle in the top right, "
    "on a yellow background"
)
for k, image in enumerate(pipe.generate(prompt, control=control, seed=1, num_images=4)):
    write_png(image, OUT / f"controlnet-{k}.png", image.info["parameters"])
    print(OUT / f"controlnet-{k}.png")
