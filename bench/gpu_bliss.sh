#!/usr/bin/env bash
# Prepared GPU benchmark of the BLISS engine (issue 11; not run by `make test`; no figures until it is run
# on a GPU). Meant to finish in under 10 minutes on one H100/H200-class GPU:
#
#   1. one outer step per hypergradient route (graph, jvp, fd with exact or finite-difference z-solve
#      products) at 160m and 410m proxies, bf16 autocast for the plain passes (SDPA picks flash
#      attention), fp32 for the finite differences, against one plain proxy step;
#   2. `select --scorer bliss` scoring documents/s at 160m (bf16), end to end on the embedded sample;
#   3. `blissctl pretrain` tokens/s and MFU at 410m and 1b (bench/gpu_pretrain.sh).
#
#   bash bench/gpu_bliss.sh                         # everything
#   PARTS="outer scoring" bash bench/gpu_bliss.sh   # a subset (outer, scoring, pretrain)
#
# Writes bench/results/bliss_outer_step_gpu_{160m,410m}.json, bliss_select_gpu.json, pretrain_gpu.json
# (and copies under $OUT when the device tool sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PARTS=${PARTS:-"outer scoring pretrain"}
ROUTES=${ROUTES:-"graph:exact,jvp:exact,fd:exact,fd:fd"}
copy_out() { [[ -n ${OUT:-} ]] && cp "bench/results/$1.json" "$OUT/" || true; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for part in $PARTS; do
  case $part in
    outer)
      # Pythia's vocabulary (50,304) and 512-token documents; batch 16 at 160m, 8 at 410m keep the
      # higher-order graphs of the exact routes within one GPU's memory.
      timeout 240 $PY bench/bench_outer_step.py --device cuda --proxy 160m --batch 16 --seq-len 512 \
        --vocab 50304 --routes "$ROUTES" --name bliss_outer_step_gpu_160m && copy_out bliss_outer_step_gpu_160m
      timeout 240 $PY bench/bench_outer_step.py --device cuda --proxy 410m --batch 8 --seq-len 512 \
        --vocab 50304 --routes "$ROUTES" --name bliss_outer_step_gpu_410m && copy_out bliss_outer_step_gpu_410m
      ;;
    scoring)
      timeout 180 $PY bench/bench_bliss_select.py --device cuda --proxy 160m --shards 4 --seq-len 512 \
        --batch-size 128 --workers 4 --name bliss_select_gpu && copy_out bliss_select_gpu
      ;;
    pretrain)
      STEPS=${STEPS:-100} SIZES="410m 1b" timeout 300 bash bench/gpu_pretrain.sh
      ;;
    *) echo "unknown part $part (outer, scoring, pretrain)" >&2; exit 2 ;;
  esac
done
