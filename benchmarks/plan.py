"""What each ``--size`` measures: crops, solver caps, scene factors (one frozen value per size).

``smoke`` proves every section runs (tiny crops, solver capped at 2 iterations: numbers are not
meaningful); ``default`` fits the 2-core CPU in well under 15 minutes on an idle machine;
``large`` uses the whole demo scene and the models' real solver settings everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.data import Crop
from benchmarks.harness import SIZES, check_choice


@dataclass(frozen=True)
class SizePlan:
    name: str
    #: crop on which model throughput and FLOPs are measured (fully valid pixels)
    model_crop: Crop
    #: DECSC solver cap in the throughput/overhead runs (None: the registry's eval setting)
    decsc_max_iter: int | None
    #: epochs of the per-scene DEQ-Unmix fit made for the throughput and pipeline runs
    unmix_fit_epochs: int
    unmix_fit_tile: int
    #: DEQ-Unmix solver cap when applying the fit (None: the fit's eval setting)
    unmix_max_iter: int | None
    #: FastHyDe / VCA+FCLS crop (same as model_crop unless smaller)
    baseline_crop: Crop
    #: BM4D is slow: timed on this crop only
    bm4d_crop: Crop
    #: scene of the overhead-ratio run (None: the whole demo scene) and its tile size
    pipeline_crop: Crop | None
    pipeline_tile: int
    #: also run the unmix-only pipeline against fit + apply on the whole scene
    unmix_pipeline: bool
    #: scaling: the model stage over this crop with 1 and 2 workers, solver cap
    scaling_crop: Crop
    scaling_tile: int
    scaling_max_iter: int | None
    #: memory: area factors of the mirrored demo scene (or of ``memory_base``) and the model run
    memory_factors: tuple[int, ...]
    memory_base: Crop | None
    memory_tile: int
    memory_model: str  # "identity" (data plane only) or "decsc"
    #: DEQ cold vs warm start: tiles of this size over this crop, solver tolerance and cap
    solver_crop: Crop
    solver_tile: int
    solver_max_iter: int
    #: side of the square float32 matmul that estimates peak FLOP/s
    matmul_n: int
    #: run the other engineers' benchmark modules in a small version (else include their results)
    run_fragments: bool
    #: scene of the CLI-vs-FastHyDe section (None: the whole 192 x 160 x 224 demo mosaic)
    cli_crop: Crop | None = None
    repeats: int = 1


_PLANS = {
    "smoke": SizePlan(
        name="smoke",
        model_crop=Crop(0, 0, 16, 16, bands=40),
        decsc_max_iter=2,
        unmix_fit_epochs=1,
        unmix_fit_tile=16,
        unmix_max_iter=5,
        baseline_crop=Crop(0, 0, 16, 16, bands=40),
        bm4d_crop=Crop(0, 0, 8, 8, bands=8),
        pipeline_crop=Crop(0, 0, 32, 32, bands=40),
        pipeline_tile=24,
        unmix_pipeline=False,
        scaling_crop=Crop(0, 0, 32, 32, bands=40),
        scaling_tile=16,
        scaling_max_iter=1,
        memory_factors=(1, 4),
        memory_base=Crop(0, 0, 16, 16, bands=16),
        memory_tile=24,
        memory_model="identity",
        solver_crop=Crop(0, 0, 16, 32, bands=40),
        solver_tile=16,
        solver_max_iter=3,
        matmul_n=256,
        run_fragments=False,
        cli_crop=Crop(0, 0, 24, 24, bands=40),
    ),
    "default": SizePlan(
        name="default",
        model_crop=Crop(0, 0, 32, 32),
        decsc_max_iter=None,
        unmix_fit_epochs=3,
        unmix_fit_tile=32,
        unmix_max_iter=None,
        baseline_crop=Crop(0, 0, 32, 32),
        bm4d_crop=Crop(0, 0, 32, 32, bands=32),
        pipeline_crop=Crop(0, 0, 48, 64),
        pipeline_tile=48,
        unmix_pipeline=True,
        scaling_crop=Crop(96, 32, 64, 128),
        scaling_tile=32,
        scaling_max_iter=2,
        # 36x (1152x960 px) beyond the 1x/4x/16x: the first size at which the
        # scene holds many whole 256 px ingest chunks in both directions, i.e. where the
        # per-chunk bounds of ingest, tiling and blending are reached
        memory_factors=(1, 4, 16, 36),
        memory_base=None,
        memory_tile=128,
        memory_model="identity",
        solver_crop=Crop(0, 0, 64, 64, bands=40),
        solver_tile=32,
        solver_max_iter=40,
        matmul_n=2048,
        run_fragments=True,
    ),
    "large": SizePlan(
        name="large",
        model_crop=Crop(0, 0, 192, 160),
        decsc_max_iter=None,
        unmix_fit_epochs=150,
        unmix_fit_tile=64,
        unmix_max_iter=None,
        baseline_crop=Crop(0, 0, 64, 96),
        bm4d_crop=Crop(0, 0, 64, 64, bands=64),
        pipeline_crop=None,
        pipeline_tile=128,
        unmix_pipeline=True,
        scaling_crop=Crop(96, 32, 64, 128),
        scaling_tile=32,
        scaling_max_iter=None,
        memory_factors=(1, 4, 16),
        memory_base=None,
        memory_tile=128,
        memory_model="decsc",
        solver_crop=Crop(0, 0, 64, 96),
        solver_tile=32,
        solver_max_iter=60,
        matmul_n=4096,
        run_fragments=True,
        repeats=2,
    ),
}


def get_plan(size: str) -> SizePlan:
    return _PLANS[check_choice("size", size, SIZES)]
