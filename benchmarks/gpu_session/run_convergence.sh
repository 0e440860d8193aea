#!/bin/bash
# The script the 2026-11-27 (third) H100 session ran (device tool: `bash benchmarks/gpu_session/run_convergence.sh`,
# carrying .gpu made by `python -m benchmarks.gpu_session.pack_data`): three fine-tunes side by side on
# the one GPU, each from the committed weights, trained at the inference iteration cap (12 forward
# iterations, was 6) with a stronger fixed-point residual regulariser, to make the solver converge
# (relative residual <= 1e-3) within the cap; then each result evaluated on the test scenes in the
# default configuration (subspace pass + guard), in parallel. Results come back as tarballs.
# DEV / MIN / CROP override the device, the training minutes and an evaluation crop (CPU dry run).
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3 COLUMNS=250
OUT=${OUT:-gpu-out}; DEV=${DEV:-cuda}; MIN=${MIN:-4.8}; CROP=${CROP:-}; MARGIN=${MARGIN:-100}
W=/tmp/conv; rm -rf $W; mkdir -p "$OUT" $W
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
# RUNS: name:arch:batch:train-iters:residual-weight:jacobian-weight:start weights[:backward[:lr]] (first
# call: the default; second call: RUNS="c6:shipped:32:6:0.05:0:… c12:shipped:32:12:0.05:0:… j6:shipped:32:6:0.05:1:…"
# MIN=3.5). Start weights "-": train from scratch; backward phantom (default) or implicit; lr default 3e-4.
# Planned next (not yet run): the implicit backward + Jacobian regularisation as fine-tunes of both weight
# files (on the 2-core CPU this recipe lowered the worst residual 1.3-2.5x and lost 0.1-0.6 dB against a
# control fine-tune, not won back in twice the time: docs/models/decsc.md, "Convergence fine-tunes"; the GPU
# run sees ~18x the pixels), and the Jacobian
# fine-tune with the SDPA fix at 6 iterations:
# RUNS="ij12:shipped:32:12:0.05:0.1:$S:implicit ij12f:full:16:12:0.05:0.1:$FW:implicit j6:shipped:32:6:0.05:0.1:$S" MIN=3.5
# (from scratch instead: start weights "-" and lr 1e-3, e.g. "ij12s:shipped:32:12:0.05:0.1:-:implicit:1e-3")
S=workers/weights/decsc.safetensors; FW=workers/weights/decsc_full.safetensors
RUNS=${RUNS:-"s_r05:shipped:32:12:0.5:0:$S s_r2:shipped:32:12:2:0:$S f_r1:full:16:12:1:0:$FW"}
for r in $RUNS; do
  IFS=: read -r n a b it rw jw f bw lr <<< "$r"
  INIT=(); [ "$f" != "-" ] && INIT=(--init-weights "$f")
  timeout $(python3 -c "print(int($MIN*60+$MARGIN))") python3 -m flows.cli train denoiser --data .gpu/data --out $W/$n \
    --minutes $MIN --batch $b --patch 64 --device $DEV --loader-workers 4 --arch $a --threads 2 --seed 4 --lr ${lr:-3e-4} \
    --extra-fraction 0.5 --train-iters $it --residual-weight $rw --jacobian-weight $jw --backward ${bw:-phantom} \
    "${INIT[@]}" > $W/train_$n.log 2>&1 &
done
wait
tail -n 2 $W/train_*.log
(cd $W && tar czf "$OUT/train.tar.gz" */decsc.safetensors */train_log.jsonl train_*.log)
EV="--data .gpu/evaldata --scenes jasper,pavia_centre --cases gauss30,band[0,95],mixture --baselines none --seed 0 --device $DEV --threads 3"
[ -n "$CROP" ] && EV="$EV --crop $CROP"
for r in $RUNS; do
  IFS=: read -r n a b it rw jw f bw lr <<< "$r"
  timeout 180 python3 -m flows.cli eval denoiser $EV --arch $a --weights $W/$n/decsc.safetensors \
    --out $W/ev_$n.md --json $W/ev_$n.json > $W/ev_$n.log 2>&1 &
done
wait
grep -h -A12 "MPSNR" $W/ev_*.md | head -60
(cd $W && tar czf "$OUT/eval.tar.gz" ev_*)
