"""Device check: the whole pipeline (ingest → tiles → DECSC → blend → DEQ-Unmix fit/apply →
blend → zarr + COG) on a Dask cluster whose worker holds the GPU.

Run on the GPU machine with the geospatial/Dask wheels carried (see ``run_pipeline_gpu.sh``)::

    python3 -m benchmarks.gpu_session.pipeline_gpu OUT_DIR [--device cuda]

The cluster is dask-cuda's ``LocalCUDACluster`` when that package imports (one worker per GPU,
``resources={"GPU": 1}``), else the documented fallback of :func:`workers.cluster.open_cluster`:
one ``LocalCluster`` worker process labelled ``GPU``. Prints one JSON object: cluster, run status,
per-stage timings from the run record, and where model tiles ran (device per tile record).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--full", action="store_true", help="the whole mosaic instead of a 96 px window"
    )
    ap.add_argument(
        "--scene",
        type=Path,
        default=None,
        help="an already cropped scene (the device transfer cap may leave the mosaic behind)",
    )
    a = ap.parse_args(argv)

    from pipeline.config import RunConfig
    from pipeline.readers.geotiff import crop_geotiff
    from workers.cluster import ClusterSpec, open_cluster
    from workers.run import Job, run_scene
    from workers.unmix.options import UnmixOptions

    a.out.mkdir(parents=True, exist_ok=True)
    scene = a.scene or (
        DEMO if a.full else crop_geotiff(DEMO, a.out / "demo_96.tif", (48, 144, 32, 128))
    )
    try:
        import dask_cuda  # noqa: F401

        kind = "dask_cuda.LocalCUDACluster"
    except ImportError:
        kind = "LocalCluster, one worker process labelled GPU (dask-cuda not installed)"
    job = Job(
        RunConfig(out_root=a.out / "runs", device=a.device, tile=64),
        unmix=UnmixOptions(endmembers=4, epochs=10),
    )
    t0 = time.perf_counter()
    with open_cluster(
        ClusterSpec(), a.device, job.preload()
    ) as handle:  # DECSC preloaded on the workers
        desc = handle.describe()
        res = run_scene(scene, job, cluster=handle)
    wall = time.perf_counter() - t0
    rec = json.loads((res.run_dir / "run.json").read_text())
    devices: dict[str, dict[str, int]] = {}
    for stage, recs in (rec.get("tiles") or {}).items():
        for r in recs:
            key = f"{r.get('device', '?')} on {r.get('worker', '?')}"
            devices.setdefault(stage, {})[key] = devices.setdefault(stage, {}).get(key, 0) + 1
    import rasterio

    with rasterio.open(res.run_dir / "denoised.tif") as ds:
        crs = ds.crs.to_string() if ds.crs else None
    out = {
        "cluster_kind": kind if handle.gpu else "CPU workers only",
        "cluster": desc,
        "status": res.status,
        "n_tiles": res.n_tiles,
        "failed_tiles": res.failed_tiles,
        "not_converged": len(res.not_converged),
        "wall_s": round(wall, 1),
        "stages_s": {
            k: v.get("wall_s") for k, v in (rec.get("stages") or {}).items() if isinstance(v, dict)
        },
        "outputs": sorted(str(Path(p).name) for p in res.outputs.values()),
        "tile_devices": devices,
        "denoised_tif_crs": crs,
    }
    print(json.dumps(out, indent=1, default=str))
    (a.out / "pipeline_gpu.json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
