"""Pack the training and evaluation data for a GPU machine that only receives 64 MiB.

``python -m benchmarks.gpu_session.pack_data --data ../shared/data --dest .gpu`` writes

* ``DEST/data``: the training data layout ``hyperdeq train denoiser --data`` reads, with the CAVE
  cubes re-quantised to 8 bits (``round(x·255)``, ``full_scale`` 255; quantisation error σ ≈ 0.0011,
  far below the noise being removed) and the remote-sensing crops copied unchanged;
* ``DEST/evaldata``: the two denoising test scenes (Jasper Ridge, Pavia Centre ``abu-beach-4``);
* ``DEST/demo_cube.npz`` and ``DEST/unmix_fit``: the demo scene and a DEQ-Unmix fit of it, for
  ``python -m benchmarks --device cuda --sections gpu`` on a machine without GDAL.

This is how the shipped DECSC weights' training data reached the H100 (docs/models/decsc.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

EXTRAS = (
    "pavia_u_sub/paviaU_subimg.mat",
    "muufl_gulfport_sub/an_hsi_image_sub_for_demo.mat",
    "anomaly_abu/HYDICE_data.mat",
    "cuprite/Rcuprite50x90x188.mat",
)
EVAL = ("jasper_ridge/Jasper.mat", "anomaly_abu/abu-beach-4.mat")


def pack(data: Path, dest: Path, demo: bool = True) -> Path:
    cave_out = dest / "data" / "cave"
    cave_out.mkdir(parents=True, exist_ok=True)
    for f in sorted((data / "cave").glob("*.npz")):
        with np.load(f) as d:
            x = d["cube"].astype(np.float64) / float(d["full_scale"])
            q = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
            np.savez_compressed(
                cave_out / f.name,
                cube=q,
                wavelengths_nm=d["wavelengths_nm"],
                full_scale=np.float32(255),
            )
    for rel in EXTRAS:
        (dest / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / rel, dest / "data" / rel)
    for rel in EVAL:
        (dest / "evaldata" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / rel, dest / "evaldata" / rel)
    if demo:
        from benchmarks.data import demo_path, export_cube
        from pipeline.readers import open_scene
        from workers.unmix.fit import fit_scene

        export_cube(dest / "demo_cube.npz")
        fit_scene(open_scene(demo_path()), 4, seed=0).save(dest / "unmix_fit")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--dest", type=Path, default=Path(".gpu"))
    ap.add_argument(
        "--no-demo", action="store_true", help="skip the demo cube export and unmixer fit"
    )
    a = ap.parse_args()
    print(pack(a.data, a.dest, demo=not a.no_demo))


if __name__ == "__main__":
    main()
