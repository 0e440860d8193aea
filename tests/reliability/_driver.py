"""Driver process for fault tests: one tiled run of a scene, as ``hyperdeq run`` does it.

``python -m tests.reliability._driver SCENE OUT [--scheduler ADDR | --workers N] [--delay S]
[--kill-at N] --log-dir DIR [--model identity|decsc]``. The run goes through
:func:`workers.run.run_scene` on a real multi-process Dask cluster; it prints one JSON line with
the result, or ``error: <Class>: <message>`` on stderr with exit status 2 (like the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scene")
    ap.add_argument("out")
    ap.add_argument("--scheduler")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--model", default="identity")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from pipeline.errors import HyperdeqError
    from tests.reliability._helpers import InstrumentedModel, fault_job, inner_model
    from workers.cluster import ClusterSpec
    from workers.run import run_scene

    model = InstrumentedModel(inner_model(a.model), a.log_dir, a.delay, a.kill_at)
    try:
        cluster = ClusterSpec(address=a.scheduler, n_workers=a.workers)
        res = run_scene(a.scene, fault_job(a.out), cluster, tile_models={"denoise": model})
    except (HyperdeqError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    print(
        json.dumps(
            {
                "status": res.status,
                "run_dir": str(res.run_dir),
                "failed": res.failed_tiles,
                "reused": res.reused,
            }
        ),
        flush=True,
    )
    return 0 if res.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
