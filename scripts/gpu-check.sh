#!/usr/bin/env bash
# The GPU checks of this project, as one command for a lent GPU machine (see
# /work/.library/device/README.md): the CUDA tests, then `make bench` on CUDA in fp16 with the
# compiled variants (--compile, --cuda-graphs) against eager ldm and diffusers.
#
# That machine has torch, transformers, accelerate, typer, rich, safetensors and pillow, but not
# diffusers, open_clip_torch or ftfy: fetch their wheels here first (pure Python), into .whl/
# (ignored: `echo /.whl/ >> .git/info/exclude`), and build the diffusers config folder:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0 \
#     lazy-importer==0.1.0
#   .venv/bin/python -c "from ldm_cli.bench.__main__ import *; diffusers_config(ROOT / 'bench-cache')"
# (versions: those of .venv here, `pip show`), then run, carrying .whl and bench-cache/sd15-config:
#   scripts/gpu-check.sh   (not yet run on a GPU: no session had one; the compiles dominate)
# Results land in $OUT (benchmarks-cuda.md, pytest.log) when the device tool sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda.py tests/runtime/test_compile.py \
    tests/runtime/test_offload.py 2>&1 | tee "$OUT/pytest.log"
# one size keeps it within a lease: each compiled tool compiles again in its own process
python3 -m ldm_cli.bench --device cuda --dtype fp16 --file-dtypes fp16 --sizes "${SIZES:-512}" \
    --steps 10 --compile-variants --tiled-vae-size 0 --out "$OUT/benchmarks-cuda.md"
