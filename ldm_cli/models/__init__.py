"""Layer 3: the networks' architectures (U-Net, VAE, CLIP and OpenCLIP text encoders, the SDXL
conditioner, the super-resolution network), with the original checkpoints' key names, and
building them from a checkpoint.
"""
