"""Checkpoint files as files: `ldm convert` (pickle, dtypes, prune, diffusers folders, baked VAE and
LoRAs) and `ldm merge` (weighted sum, add difference), tensor by tensor."""
