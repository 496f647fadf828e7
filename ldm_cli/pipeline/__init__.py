"""Layer 5: the render path (request, conditioning, guidance, sampling, VAE codec, PNG
parameters) and loading; its tasks (img2img, inpaint, hires fix, upscalers, SDXL, refiner)
in pipeline.tasks.
"""
