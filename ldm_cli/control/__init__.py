"""Structure from an image: ControlNet files (`files`), the control images' preprocessors
(`preprocessors`), the control units of a run (`units`) and their residuals at each U-Net call
(`apply`)."""
