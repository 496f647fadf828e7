"""Layer 1: checkpoint files: safetensors and pickle headers and tensors, saving, hashing, and
detecting the model family from tensor shapes.
"""
