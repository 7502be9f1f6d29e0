#!/usr/bin/env bash
# The whole experiment (10 rounds, 2 of 10 clients per round) through a real Flower
# simulation on this machine's GPU, with the Phi-4-mini-shaped model, timed end to end
# (SuperLink and Ray start, model loads, every round, checkpoints, shutdown).
#
#   . bench/device_setup.sh && bench/federated_wall_time.sh DATA.jsonl OUT_DIR [key=value ...]
#
# Extra key=value pairs are added to --run-config (e.g. model.gradient-checkpointing=true).
# Writes OUT_DIR/RECIPE-metrics.json (fedcoder: also its loss plot) and prints the wall time.
# CLIENT_GPUS=0.5 lets the two clients of a round share the GPU. RECIPE=reference runs the
# FlowerTune baseline's app instead (bench/flowertune_reference), through the same launcher.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0"
  exit 2
fi
data=$(realpath "$1")
out=$(mkdir -p "$2" && realpath "$2")
shift 2
recipe=${RECIPE:-fedcoder}
model=${PHI4MINI_DIR:-/tmp/phi4mini_random}
python3 bench/phi4mini.py --tokenizer "${O200K_DIR:-/tmp/o200k_tok}" "$model"
runs=$(mktemp -d)
if [ "$recipe" = fedcoder ]; then
  command=(python3 -m fedcoder.cli run --client-gpus "${CLIENT_GPUS:-1}" --run-config
    "model.name='$model' static.dataset.name='$data' results.dir='$runs' results.run-name='fedcoder' $*")
elif [ "$recipe" = reference ]; then
  # The app imports its recipe from bench/train_throughput.py; fedcoder's launcher runs it.
  export PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
  command=(python3 -c 'import sys; from pathlib import Path
from fedcoder.simulation import run_simulation
sys.exit(run_simulation(Path(sys.argv[1]), client_gpus=float(sys.argv[2]), run_config=sys.argv[3:]))'
    bench/flowertune_reference "${CLIENT_GPUS:-1}"
    "model-path='$model' data-path='$data' out='$runs/reference-metrics.json' $*")
else
  echo "RECIPE must be fedcoder or reference, not '$recipe'" >&2
  exit 2
fi
started=$(date +%s.%N)
# Each output line gets the seconds since the start, to see where the time goes.
"${command[@]}" 2>&1 | python3 -c 'import sys, time
start = time.time()
for line in sys.stdin:
    print(f"{time.time() - start:7.1f} {line}", end="", flush=True)'
ended=$(date +%s.%N)
if [ "$recipe" = fedcoder ]; then
  cp "$runs/fedcoder/metrics.json" "$out/fedcoder-metrics.json"
  cp "$runs/fedcoder/train_loss.png" "$out/fedcoder-train_loss.png" 2>/dev/null || true
else
  cp "$runs/reference-metrics.json" "$out/reference-metrics.json"
fi
python3 -c "print(f'$recipe run wall time: {$ended - $started:.1f} s')" | tee "$out/$recipe-wall.txt"
