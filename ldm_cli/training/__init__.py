"""Training: the whole latent diffusion model stage by stage (`model_run`, `ldm train model`),
the x4 diffusion upscaler (`upscaler_run`) and the super-resolution network (`sr_stage`,
`ldm train upscaler`), on one shared loop (`loop`: accelerate, EMA, exact resume)."""
