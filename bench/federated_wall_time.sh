#!/usr/bin/env bash
# The whole experiment (10 rounds, 2 of 10 clients per round) through a real Flower
# simulation on this machine's GPU, with the Phi-4-mini-shaped model, timed end to end
# (SuperLink and Ray start, model loads, every round, checkpoints, shutdown).
#
#   . bench/device_setup.sh && bench/federated_wall_time.sh DATA.jsonl OUT_DIR [key=value ...]
#
# RECIPE=fedcoder (default) runs `fedcoder run`; RECIPE=reference runs the FlowerTune
# baseline's app (bench/flowertune_reference) through the same launcher; RECIPE=both runs
# the reference, then fedcoder, and prints how many times faster fedcoder was.
# ROUNDS, STEPS, BATCH and SAVE_EVERY (10, 10, 16, 5) shape the experiment of either recipe;
# extra key=value pairs go to one recipe's --run-config, so not with RECIPE=both.
# CLIENT_GPUS (fedcoder, default 1; 0.5 lets a round's two clients share the GPU) and
# REFERENCE_CLIENT_GPUS (default 1, as the baseline's federation has it) are per client.
# Writes OUT_DIR/RECIPE-metrics.json (fedcoder: also its loss plot) and RECIPE-wall.txt.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,15p' "$0"
  exit 2
fi
data=$(realpath "$1")
out=$(mkdir -p "$2" && realpath "$2")
shift 2
case ${RECIPE:-fedcoder} in
  fedcoder | reference) recipes=${RECIPE:-fedcoder} ;;
  both) recipes="reference fedcoder" ;;
  *) echo "RECIPE must be fedcoder, reference or both, not '$RECIPE'" >&2; exit 2 ;;
esac
if [ "${RECIPE:-}" = both ] && [ $# -gt 0 ]; then
  echo "key=value pairs name one recipe's keys: not with RECIPE=both" >&2
  exit 2
fi
rounds=${ROUNDS:-10} steps=${STEPS:-10} batch=${BATCH:-16} save_every=${SAVE_EVERY:-5}
model=${PHI4MINI_DIR:-/tmp/phi4mini_random}
# Without a GPU the reference trains in full precision (train_throughput.make_experiment):
# so does fedcoder, for the same numerics (on a GPU both default to nf4, 8-bit AdamW, bf16).
numerics=""
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  numerics="model.quantization=0 train.training-arguments.optim='adamw_torch'
    train.training-arguments.bf16=false"
fi
python3 bench/phi4mini.py --tokenizer "${O200K_DIR:-/tmp/o200k_tok}" "$model"
runs=$(mktemp -d)

for recipe in $recipes; do
  if [ "$recipe" = fedcoder ]; then
    command=(python3 -m fedcoder.cli run --client-gpus "${CLIENT_GPUS:-1}" --run-config
      "model.name='$model' static.dataset.name='$data' results.dir='$runs'
       results.run-name='fedcoder' num-server-rounds=$rounds
       train.training-arguments.max-steps=$steps
       train.training-arguments.per-device-train-batch-size=$batch
       train.save-every-round=$save_every $numerics $*")
  else
    # The app imports its recipe from bench/train_throughput.py; fedcoder's launcher runs it.
    command=(env "PYTHONPATH=$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import sys
from pathlib import Path
from fedcoder.simulation import run_simulation
sys.exit(run_simulation(Path(sys.argv[1]), client_gpus=float(sys.argv[2]), run_config=sys.argv[3:]))'
      bench/flowertune_reference "${REFERENCE_CLIENT_GPUS:-1}"
      "model-path='$model' data-path='$data' out='$runs/reference-metrics.json'
       num-server-rounds=$rounds max-steps=$steps batch-size=$batch
       save-every-round=$save_every $*")
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
done

if [ "${RECIPE:-}" = both ]; then
  python3 - "$out" <<'PY' | tee "$out/speedup.txt"
import sys
from pathlib import Path

def seconds(recipe: str) -> float:
    return float((Path(sys.argv[1]) / f"{recipe}-wall.txt").read_text().split()[-2])

print(f"fedcoder end to end: {seconds('reference') / seconds('fedcoder'):.2f}x the reference")
PY
fi
