import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture(scope="session")
def reference_dir():
    path = os.path.abspath(os.environ.get("LDM_REFERENCE_DIR", REFERENCE))
    if not os.path.isdir(path):
        pytest.skip("../shared/reference not present")
    return path
