#!/usr/bin/env bash
# Device check: the whole pipeline on a Dask cluster whose worker holds the GPU.
# The device image has torch but no Dask/zarr/GDAL: they travel as cp312 wheels in .whl/
# (dask, distributed, tornado, tblib, zict, partd, locket, zarr, numcodecs, donfig, google-crc32c,
# rioxarray, rasterio, affine, pyproj, cligj, click-plugins, lazy-importer; pystac copied as a
# package into .whl/site), with the 96 px demo crop as .whl/demo_96.tif.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m benchmarks.gpu_session.pipeline_gpu "$OUT/pg" --device cuda --scene .whl/demo_96.tif 2>&1 \
  | grep -v "distributed\.\(core\|scheduler\|nanny\|worker\|http\)" | tee "$OUT/pipeline_gpu.log" | tail -60
cp "$OUT/pg/pipeline_gpu.json" "$OUT/" 2>/dev/null
