#!/usr/bin/env bash
# Issue 22's GPU measurements (device tool, from the repository root:
# `bash benchmarks/gpu_session/run_issue22_gpu.sh`; results under $OUT, which the tool collects):
# DECSC with the default settings on a 1024 x 1024 x 224 scene mirrored from the demo mosaic
# (model alone: MVox/s, GPU busy fraction), then `hyperdeq run SCENE --device cuda --no-unmix` in a
# fresh process (wall time, run.json). See benchmarks/gpu_session/issue22_gpu.py.
#
# Python: the machine's python3 when it imports torch, rasterio, prefect, dask (and the rest of the
# run's imports); else a venv made by `make install` (the Makefile's install target, torch==2.13.0:
# CUDA wheels on a GPU machine),
# created with --system-site-packages so that a torch already installed there is reused when it
# satisfies the pin. The whole script aims at TOTAL (480) seconds: the measurement's own limit (LIMIT,
# 420) shrinks by the time an installation took (never below 120 s), and `timeout` stops it 60 s
# after that limit. SIZE / DEV override the scene side and the device (a CPU dry run:
# `SIZE=64 DEV=cpu OUT=/tmp/i22 bash benchmarks/gpu_session/run_issue22_gpu.sh`).
# Files in $OUT (at most 7; the device tool returns few): issue22_gpu.md/.json, issue22_gpu.log,
# run.json and cli_run.log (the CLI run), env.txt (GPU, python, torch), install.log (if installing).
set -euo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=250
OUT=${OUT:-gpu-out}; SIZE=${SIZE:-1024}; DEV=${DEV:-cuda}; LIMIT=${LIMIT:-420}; TOTAL=${TOTAL:-480}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/issue22_work.XXXXXX)
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUT/env.txt" || echo "nvidia-smi: not available" | tee "$OUT/env.txt"

# the four the issue names, and the rest of the run's imports that a bare image may lack
CHECK='import torch, rasterio, prefect, dask, distributed, zarr, xarray, rioxarray, safetensors, typer, pystac'
PY=python3
if ! python3 -c "$CHECK" 2>/dev/null; then
  PY=$PWD/.venv/bin/python
  if ! { [ -x "$PY" ] && "$PY" -c "$CHECK" 2>/dev/null; }; then
    echo "installing: python3 lacks one of torch, rasterio, prefect, dask -> make install" | tee "$OUT/install.log"
    [ -x "$PY" ] || python3 -m venv --system-site-packages .venv
    if command -v make >/dev/null 2>&1; then
      make install PYTHON=python3 >>"$OUT/install.log" 2>&1 || true
    else  # the same steps as the Makefile's install target
      { "$PY" -m pip install -q --upgrade pip && "$PY" -m pip install -q "torch==2.13.0" \
          && "$PY" -m pip install -q -e ".[test]"; } >>"$OUT/install.log" 2>&1 || true
    fi
    if ! "$PY" -c "$CHECK" >>"$OUT/install.log" 2>&1; then
      printf '# Issue 22, GPU: not measured\n\nThe installation failed (%s s); last lines of install.log:\n\n```\n%s\n```\n' \
        "$(( $(date +%s) - T0 ))" "$(tail -n 20 "$OUT/install.log")" > "$OUT/issue22_gpu.md"
      cat "$OUT/issue22_gpu.md"
      exit 1
    fi
    echo "installed in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/install.log"
  fi
fi
"$PY" -c "import sys, torch; print(sys.executable, torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/env.txt"

SPENT=$(( $(date +%s) - T0 ))
LIMIT=$(( LIMIT < TOTAL - 60 - SPENT ? LIMIT : TOTAL - 60 - SPENT ))
LIMIT=$(( LIMIT > 120 ? LIMIT : 120 ))
echo "measuring: --time-limit-s $LIMIT, timeout $(( LIMIT + 60 )) s ($SPENT s spent before)"
rc=0
timeout $(( LIMIT + 60 )) "$PY" -m benchmarks.gpu_session.issue22_gpu --out "$OUT" --size "$SIZE" --device "$DEV" \
  --time-limit-s "$LIMIT" --work "$WORK" 2>&1 | tee "$OUT/issue22_gpu.log" | tail -n 40 || rc=$?
# the run record(s) of the CLI run, also when the module was stopped before copying them
find "$WORK" -name run.json -path '*/cli/*' -exec cp {} "$OUT/" \; 2>/dev/null || true
rm -rf "$WORK"
echo "issue22: exit $rc after $(( $(date +%s) - T0 )) s; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
