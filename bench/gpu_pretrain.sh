#!/usr/bin/env bash
# Prepared GPU benchmark of `blissctl pretrain` (not run by `make test`; no figures until it is run on a GPU).
#
# Trains Pythia-410M and Pythia-1B from scratch on the embedded sample for STEPS steps each under torchrun
# (all visible GPUs, bf16, NCCL; 1b uses FSDP by default) and reports steady-state tokens/s and MFU from
# the runs' events.jsonl (steps after the first 20% are averaged). Sequence length 2048 as in Pythia; the
# global batch is one micro-batch per GPU so a few hundred steps fit in minutes (the Pythia batch of 2M
# tokens only adds accumulation, which does not change tokens/s).
#
#   bash bench/gpu_pretrain.sh                  # STEPS=200 SIZES="410m 1b" COMPILE=0
#   STEPS=300 COMPILE=1 bash bench/gpu_pretrain.sh
#
# Writes bench/results/pretrain_gpu.json (and a copy under $OUT when the device tool sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
SIZES=${SIZES:-"410m 1b"}
COMPILE=${COMPILE:-0}
RUNS=${RUNS:-$(mktemp -d /tmp/bench-gpu-XXXX)}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
TOKENIZER=${TOKENIZER:-../shared/tokenizers/gpt-neox-20b/tokenizer.json}
declare -A MICRO=([410m]=16 [1b]=8 [1.4b]=8 [2.8b]=4 [160m]=32 [llama-0.5b]=16)

DATA=$($PY -c 'from engine.data.sample import sample_pool_glob; print(sample_pool_glob())')
TOKARG=()
[[ -f $TOKENIZER ]] && TOKARG=(--tokenizer "$TOKENIZER")
COMPILEARG=()
[[ $COMPILE == 1 ]] && COMPILEARG=(--compile)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for size in $SIZES; do
  mb=${MICRO[$size]:-8}
  echo "=== $size: micro-batch $mb × 2048 × $NPROC GPU(s), $STEPS steps"
  $PY -m blissctl pretrain --data "$DATA" "${TOKARG[@]}" --size "$size" --seq-len 2048 \
    --micro-batch "$mb" --global-batch-tokens $((mb * 2048 * NPROC)) --steps "$STEPS" --log-every 10 \
    --save-every 1000000 --nproc-per-node "$NPROC" --runs-dir "$RUNS" --run "gpu-$size" "${COMPILEARG[@]}"
done

$PY - "$RUNS" "$STEPS" "$COMPILE" $SIZES <<'EOF'
import json, os, sys
from pathlib import Path

import torch

runs, steps, compiled, sizes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
result = {"benchmark": "blissctl pretrain on GPU", "device": torch.cuda.get_device_name(0),
          "gpus": torch.cuda.device_count(), "torch": torch.__version__, "steps": steps, "compile": compiled,
          "sizes": {}}
for size in sizes:
    events = [json.loads(line) for line in (runs / f"gpu-{size}" / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["kind"] == "start")
    window = [e for e in events if e["kind"] == "step" and e["step"] > steps // 5]
    tps = sum(e["tokens_per_s"] for e in window) / len(window)
    mfu = sum(e.get("mfu", 0.0) for e in window) / len(window)
    result["sizes"][size] = {"params": start["params"], "fsdp": start["fsdp"], "micro_batch": start["micro_batch"],
                             "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
                             "final_loss": window[-1]["loss"]}
    print(f"{size}: {start['params'] / 1e6:.0f}M params, {'FSDP' if start['fsdp'] else 'DDP'}, "
          f"{tps:,.0f} tokens/s, MFU {mfu:.1%} (goal ≥ 40%)")
text = json.dumps(result, indent=2)
Path("bench/results").mkdir(parents=True, exist_ok=True)
Path("bench/results/pretrain_gpu.json").write_text(text + "\n")
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "pretrain_gpu.json").write_text(text + "\n")
print(text)
EOF
