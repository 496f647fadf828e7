"""What the pipeline renders besides text-to-image: img2img, inpainting, outpainting, the hires
fix, diffusion and feed-forward upscalers, SDXL and its refiner.
"""
