"""Reading every tensor of a small model file at once: LoRAs, embeddings, ControlNets.

`.safetensors` files are read with safetensors; anything else is a pickle, read by torch's
weights-only unpickler and only with --allow-pickle (`checkpoints.pickled`). Failures are
one-line UserErrors that say what kind of file was being read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.checkpoints.pickled import load_weights_only
from ldm_cli.core.errors import UserError


def read_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the file at `path`, a `what` ("LoRA", "ControlNet")."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as file:
                metadata = file.metadata() or {}
                return {key: file.get_tensor(key) for key in file.keys()}, metadata  # noqa: SIM118
        state = load_weights_only(path)  # refused without --allow-pickle
    except UserError:
        raise
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except Exception as error:  # a damaged or unsafe file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {what} {path}: {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds no tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
