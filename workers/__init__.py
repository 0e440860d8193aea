"""hyperdeq compute side: DEQ core, DECSC denoiser, DEQ-Unmix unmixer, weights, tile inference.

Models are pure torch and know nothing of Dask or Prefect.
"""
