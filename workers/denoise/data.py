"""Training data of DECSC and its band guard: real clean cubes, never the test scenes.

CAVE (main) plus small remote-sensing crops (Pavia University, MUUFL, HYDICE, Cuprite) from the
shared data folder; two CAVE scenes are held out for validation. Patches are drawn away from
near-zero backgrounds and augmented (flips, 90-degree rotations, spectral reversal and, for
sensors with many bands, spectral sub-sampling). Nothing here is used at inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ReadError

#: CAVE scenes kept out of training (validation of the denoiser and of the guard)
HELD_OUT_CAVE = ("balloons_ms_256.npz", "real_and_fake_apples_ms_256.npz")
FORBIDDEN = ("jasper", "abu-beach")  # the project's denoising test scenes


def load_cave(path: Path) -> np.ndarray:
    """A CAVE npz as a (31, H, W) float32 cube in [0, 1]."""
    with np.load(path) as d:
        return (d["cube"].astype(np.float32) / float(d["full_scale"])).transpose(2, 0, 1).clip(0, 1)


def _minmax(cube: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(cube, [0.1, 99.9])
    return ((cube - lo) / max(hi - lo, 1e-6)).clip(0, 1).astype(np.float32)


def load_extras(data_dir: Path) -> list[np.ndarray]:
    """Remote-sensing training crops as (B, H, W) float32 in [0, 1] (robust min-max per cube)."""
    import scipy.io as sio

    items = [
        ("pavia_u_sub/paviaU_subimg.mat", "paviaU_subimg"),
        ("muufl_gulfport_sub/an_hsi_image_sub_for_demo.mat", "hsi_img_sub"),
        ("anomaly_abu/HYDICE_data.mat", "data"),
        ("cuprite/Rcuprite50x90x188.mat", "Rcuprite50x90x188"),
    ]
    cubes = []
    for rel, key in items:
        p = data_dir / rel
        if not p.is_file():
            continue
        cube = np.asarray(sio.loadmat(p)[key], dtype=np.float32).transpose(2, 0, 1)
        if "muufl" in rel:
            cube = cube[4:-4]  # edge bands are noisy and negative: not clean targets
        cubes.append(_minmax(cube))
    return cubes


def load_training_data(data_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """(CAVE training cubes, extra cubes, names used) from ``data_dir``."""
    cave_dir = data_dir / "cave"
    files = sorted(cave_dir.glob("*.npz"))
    if not files:
        raise ReadError(
            f"no CAVE scenes found under {str(cave_dir)!r}; point --data at the shared data folder"
        )
    names = [f.name for f in files if f.name not in HELD_OUT_CAVE]
    assert not any(b in n for n in names for b in FORBIDDEN)
    cave = [load_cave(cave_dir / n) for n in names]
    return cave, load_extras(data_dir), names


def sample_patch(cube: np.ndarray, bands: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """A (bands, patch, patch) patch with some signal, randomly augmented."""
    b, h, w = cube.shape
    p = min(patch, h, w)
    for _ in range(20):
        stride = 1
        if b >= 2 * bands and rng.random() < 0.5:
            stride = int(rng.integers(2, b // bands + 1))
        span = (bands - 1) * stride + 1
        s0 = int(rng.integers(0, b - span + 1))
        y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        out = cube[s0 : s0 + span : stride, y0 : y0 + p, x0 : x0 + p]
        if out.mean() > 0.03 and np.percentile(out, 90) > 0.06:  # away from dark backgrounds
            break
    if p < patch:
        out = np.pad(out, ((0, 0), (0, patch - p), (0, patch - p)), mode="reflect")
    out = np.rot90(out, int(rng.integers(0, 4)), axes=(1, 2))
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out, dtype=np.float32)
