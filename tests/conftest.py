import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per test process, and for the `ldm` processes tests start: the suite runs two
# xdist workers on two cores, and its models are tiny. Two threads each made four OpenMP teams
# spin against each other on two cores (a ControlNet evaluation took 161 s in the suite, 41 s
# alone). Set before torch is imported; a run that sets OMP_NUM_THREADS keeps its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# model hashes are cached on disk (ldm_cli.checkpoints.hash): never in the user's own cache, and
# each
# test run starts with none, subprocesses included
os.environ["LDM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldm-test-cache-")

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture(scope="session")
def reference_dir():
    path = os.path.abspath(os.environ.get("LDM_REFERENCE_DIR", REFERENCE))
    if not os.path.isdir(path):
        pytest.skip("../shared/reference not present")
    return path


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread while a module runs its tiny models in-process (`pytestmark =
    pytest.mark.usefixtures("single_torch_thread")`): they gain nothing from threads, and the
    suite's two workers share two cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
