#!/usr/bin/env bash
# The whole experiment (10 rounds, 2 of 10 clients per round) through a real Flower
# simulation on this machine's GPU, with the Phi-4-mini-shaped model, timed end to end
# (SuperLink and Ray start, model loads, every round, checkpoints, shutdown).
#
#   . bench/device_setup.sh && bench/federated_wall_time.sh DATA.jsonl OUT_DIR [key=value ...]
#
# Extra key=value pairs are added to --run-config (e.g. model.gradient-checkpointing=true).
# Writes OUT_DIR/fedcoder-metrics.json, OUT_DIR/fedcoder-train_loss.png and prints the wall time.
# CLIENT_GPUS=0.5 lets the two clients of a round share the GPU.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
data=$(realpath "$1")
out=$2
shift 2
model=${PHI4MINI_DIR:-/tmp/phi4mini_random}
python3 bench/phi4mini.py --tokenizer "${O200K_DIR:-/tmp/o200k_tok}" "$model"
runs=$(mktemp -d)
started=$(date +%s.%N)
# Each output line gets the seconds since the start, to see where the time goes.
python3 -m fedcoder.cli run --client-gpus "${CLIENT_GPUS:-1}" --run-config \
  "model.name='$model' static.dataset.name='$data' results.dir='$runs' results.run-name='fedcoder' $*" \
  2>&1 | python3 -c 'import sys, time
start = time.time()
for line in sys.stdin:
    print(f"{time.time() - start:7.1f} {line}", end="", flush=True)'
ended=$(date +%s.%N)
mkdir -p "$out"
cp "$runs/fedcoder/metrics.json" "$out/fedcoder-metrics.json"
cp "$runs/fedcoder/train_loss.png" "$out/fedcoder-train_loss.png" 2>/dev/null || true
python3 -c "print(f'fedcoder run wall time: {$ended - $started:.1f} s')" | tee "$out/fedcoder-wall.txt"
