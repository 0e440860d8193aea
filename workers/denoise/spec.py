"""Frozen registry spec of the DECSC denoiser (looked up as ``get_spec("decsc")``)."""

from __future__ import annotations

from dataclasses import asdict

from workers.registry import ModelSpec, SolverConfig, WeightsRef

from .decsc import DECSCConfig

# spectral windowing used for band counts other than the trained window (see docs/models/decsc.md)
WINDOW_STRIDE = 16

#: the full-size model (``ARCH_PRESETS["full"]`` in :mod:`workers.denoise.api`), GPU-trained; it
#: ships beside the default weights and is chosen with ``denoise_arch="full"`` (``--denoiser full``)
FULL_WEIGHTS_FILE = "decsc_full.safetensors"
FULL_WEIGHTS_SHA256 = "d10af39928eddc11419f5ecaab997e184b563fe067bb9e3063d837a6b3e775a3"

#: the band guard (``workers.denoise.guard``): per band, hands part of the noisy input back where
#: the model over-smooths (nearly clean bands among noisy ones); trained with ``hyperdeq train guard``
GUARD_WEIGHTS_FILE = "decsc_guard.safetensors"
GUARD_WEIGHTS_SHA256 = "070c9d72f28086cddec8f612ea4abcb240ac35f731dbb1ff51a03ee809184d7e"

SPEC = ModelSpec(
    name="decsc",
    halo=16,
    band_handling=(
        f"sliding {DECSCConfig().bands}-band spectral window, stride {WINDOW_STRIDE}, Hann-blended "
        "overlaps; fewer bands are symmetrically padded along the spectrum"
    ),
    # eval_max_iter 12: the same MPSNR as 30 within 0.12 dB at half the cost (docs/models/decsc.md);
    # training backward: the phantom gradient (TorchDEQ)
    solver=SolverConfig(
        method="anderson",
        tol=1e-3,
        max_iter=6,
        backward_max_iter=6,
        eval_max_iter=12,
        m=5,
        lam=1e-4,
        backward="phantom",
        phantom_steps=3,
        phantom_tau=0.6,
    ),
    weights={
        "shipped": WeightsRef(
            "decsc.safetensors", "f8e6375cf00839b3839249764261daa2d4fa6cc26284c71d4633137278ed675c"
        ),
        "full": WeightsRef(FULL_WEIGHTS_FILE, FULL_WEIGHTS_SHA256),
        "guard": WeightsRef(GUARD_WEIGHTS_FILE, GUARD_WEIGHTS_SHA256),
    },
    default_weights="shipped",
    loader="workers.infer:load_decsc",
    config={**asdict(DECSCConfig()), "window_stride": WINDOW_STRIDE},
)
