"""Layer 0: errors, limits, configurations and presets, devices, numerics, tiling, PNG
parameters, image input and metrics, the embedded files' paths. Imports nothing else of
ldm_cli.
"""
