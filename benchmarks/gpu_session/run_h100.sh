#!/bin/bash
# The script the 2026-11-26 H100 session ran (device tool: `bash benchmarks/gpu_session/run_h100.sh`,
# carrying .gpu made by `python -m benchmarks.gpu_session.pack_data`): the GPU benchmark section,
# then the shipped-size and the full-size DECSC trained side by side on the one GPU, then the CUDA
# tests and the evaluation of both weight sets. $OUT is where the device tool collects files.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 COLUMNS=250
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
HYPERDEQ_BENCH_CUBE=.gpu/demo_cube.npz HYPERDEQ_BENCH_UNMIX_FIT=.gpu/unmix_fit timeout 210 \
  python3 -m benchmarks --size default --device cuda --sections gpu --out "$OUT/bench_cuda.md" \
  --json "$OUT/bench_default_cuda.json"
for a in shipped full; do
  if [ $a = shipped ]; then B=32; else B=16; fi
  python3 -m flows.cli train denoiser --data .gpu/data --out "$OUT/$a" --minutes 5.2 --batch $B --patch 64 \
    --device cuda --loader-workers 6 --arch $a --threads 2 > "$OUT/train_$a.log" 2>&1 &
done
wait
python3 -m pytest -q -m gpu tests/workers/test_gpu.py -p no:cacheprovider
EV="--data .gpu/evaldata --scenes jasper,pavia_centre --cases gauss30,band[0,95],mixture --baselines none --seed 0 --device cuda"
python3 -m flows.cli eval denoiser $EV --arch full --weights "$OUT/full/decsc.safetensors" \
  --out "$OUT/ev_full_cuda.md" --json "$OUT/ev_full_cuda.json"
python3 -m flows.cli eval denoiser $EV --weights "$OUT/shipped/decsc.safetensors" \
  --out "$OUT/ev_shipped_cuda.md" --json "$OUT/ev_shipped_cuda.json"
