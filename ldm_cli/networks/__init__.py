"""Layer 4: extra networks patched into a loaded model: LoRA files, their keys and prompt tags."""
