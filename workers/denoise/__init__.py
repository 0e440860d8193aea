"""DECSC hyperspectral denoiser (arXiv 2508.15553): model, spec, API, training."""
