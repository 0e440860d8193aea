#!/bin/bash
# The script the 2026-11-27 H100 session ran (device tool: `bash benchmarks/gpu_session/run_finetune.sh`,
# carrying .gpu made by `python -m benchmarks.gpu_session.pack_data`): both shipped weight files
# fine-tuned side by side on the one GPU (warm restart from the committed weights, new seed, half the
# patches from the remote-sensing crops), then the full-size result evaluated on the test scenes.
# Results are packed into two tarballs because the device tool returns at most 8 files.
# DEV / MIN / EVAL override the device, the training minutes and whether to evaluate (for a CPU dry run).
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 COLUMNS=250
OUT=${OUT:-gpu-out}; DEV=${DEV:-cuda}; MIN=${MIN:-6.0}; EVAL=${EVAL:-1}
W=/tmp/ft; rm -rf $W; mkdir -p "$OUT" $W
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
for a in shipped full; do
  if [ $a = shipped ]; then B=32; F=workers/weights/decsc.safetensors; else B=16; F=workers/weights/decsc_full.safetensors; fi
  timeout $(python3 -c "print(int($MIN*60+150))") python3 -m flows.cli train denoiser --data .gpu/data --out $W/$a \
    --minutes $MIN --batch $B --patch 64 --device $DEV --loader-workers 6 --arch $a --threads 2 --seed 1 --lr 5e-4 \
    --extra-fraction 0.5 --init-weights $F > $W/train_$a.log 2>&1 &
done
wait
tail -n 3 $W/train_*.log
(cd $W && tar czf "$OUT/train.tar.gz" .)
[ "$EVAL" = 1 ] || exit 0
EV="--data .gpu/evaldata --scenes jasper,pavia_centre --cases gauss30,band[0,95],mixture --baselines none --seed 0 --device $DEV"
python3 -m flows.cli eval denoiser $EV --arch full --weights $W/full/decsc.safetensors --subspace 0 --no-guard \
  --out $W/ev_full_alone.md --json $W/ev_full_alone.json 2>&1 | tail -n 12
(cd $W && tar czf "$OUT/eval.tar.gz" ev_*)
python3 -m flows.cli eval denoiser $EV --arch full --weights $W/full/decsc.safetensors --subspace 8 \
  --out $W/ev_full_sub.md --json $W/ev_full_sub.json 2>&1 | tail -n 12
(cd $W && tar czf "$OUT/eval.tar.gz" ev_*)
