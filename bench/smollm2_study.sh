#!/usr/bin/env bash
# The SmolLM2-135M-Instruct study (docs/results.md) on one GPU, as one command:
# federated and centralized training, held-out loss of base / federated / centralized,
# `fedcoder eval` of all three on the four tasks in completion (leaderboard) and chat
# mode, greedy, and the federated adapter on a 4-bit base (HumanEval).
#
#   bash bench/smollm2_study.sh DATA_DIR WORK_DIR
#
# DATA_DIR holds code_alpaca_2k.jsonl, mbpp.jsonl and multipl-e_humaneval-{cpp,js}.jsonl.
# Three chains of steps share the GPU. A 135M model leaves it mostly idle: generation is
# bound by host work per decoding step, so on the H100 two evaluations beside training each
# ran at ~100 ms a step against 66-83 ms alone, and training was no slower.
# Rerunning into the same WORK_DIR continues: finished steps are skipped and an
# evaluation resumes at its first unscored task. WORK_DIR/times.tsv gets each step's
# wall time and exit status, WORK_DIR/logs/ each step's output.
#
# A dry run on a CPU, to check the script end to end (a small DATA_DIR copy):
#   ROUNDS=1 STEPS=1 CLIENT_GPUS=0 RUN_EXTRA='train.training-arguments.per-device-train-batch-size=2' \
#   EVAL_EXTRA='--limit 1 --max-new-tokens 4' bash bench/smollm2_study.sh DATA_DIR /tmp/dry
set -u
DATA=$(realpath "${1:?usage: smollm2_study.sh DATA_DIR WORK_DIR}")
WORK=$(realpath -m "${2:?usage: smollm2_study.sh DATA_DIR WORK_DIR}")
BASE=builtin:smollm2-135m-instruct
DATASET=$DATA/code_alpaca_2k.jsonl
ROUNDS=${ROUNDS:-10}  # num-server-rounds: the last checkpoint is peft_$ROUNDS
STEPS=${STEPS:-10}  # a federated client's steps a round; the single central client takes twice
CLIENT_GPUS=${CLIENT_GPUS:-0.5}  # the two clients of a round train side by side on one GPU
# Batches of 256: each task but MBPP (500, two batches) in one; three evaluations at
# batch 512 side by side ran out of memory on an 80 GB H100. At most 512 new tokens: at the
# full leaderboard length every passing HumanEval completion of the base model had at most
# 203 tokens and every one over 256 failed (docs/results.md), so the cap cuts runaway
# generations that fail either way.
# shellcheck disable=SC2206  # EVAL_EXTRA is meant to split into flags
EVAL_FLAGS=(--greedy --batch-size 256 --max-new-tokens 512 --data-dir "$DATA" ${EVAL_EXTRA:-})
mkdir -p "$WORK/logs" "$WORK/loss" "$WORK/eval" "$WORK/done"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # the KV cache grows every step

. "$(dirname "$0")/timed.sh"

# step NAME COMMAND...: `timed`, once (skipped when WORK/done/NAME exists).
step() {
  [ -e "$WORK/done/$1" ] && return 0
  timed "$@" && touch "$WORK/done/$1"
}

# train NAME SUPERNODES STEPS ['OVERRIDES']: a `fedcoder run` of bench/smollm2_study.toml.
train() {
  rm -rf "${WORK:?}/runs/$1"  # a run cut off part-way starts again
  python3 -m fedcoder.cli run --config bench/smollm2_study.toml --num-supernodes "$2" \
    --client-gpus "$CLIENT_GPUS" --client-cpus 2 --run-config \
    "static.dataset.name='$DATASET' results.dir='$WORK/runs' results.run-name='$1' \
     num-server-rounds=$ROUNDS train.training-arguments.max-steps=$3 ${4:-} ${RUN_EXTRA:-}"
}

adapter() { echo "$WORK/runs/$1/peft_$ROUNDS"; }

wait_for_training() {
  until [ -e "$WORK/training-finished" ]; do sleep 2; done
  [ -e "$WORK/done/train-federated" ] && [ -e "$WORK/done/train-central" ]
}

loss() {  # loss NAME [ADAPTER]
  python3 -m fedcoder.cli loss --base "$BASE" ${2:+--adapter "$2"} --dataset "$DATASET" \
    --holdout-fraction 0.1 --batch-size 32 --out "$WORK/loss/$1.json"
}

evaluate() {  # evaluate NAME MODE [ADAPTER]
  python3 -m fedcoder.cli eval --base "$BASE" ${3:+--adapter "$3"} --mode "$2" \
    "${EVAL_FLAGS[@]}" --out "$WORK/eval/$1"
}

# Convert the GGUF once, before several processes would race to do it.
step convert python3 -c "from fedcoder.model import resolve_model_path as r; print(r('$BASE'))" \
  || exit 1
rm -f "$WORK/training-finished"
(  # chain 1: both trainings, the three held-out losses, the federated adapter's evaluations
  step train-federated train federated 10 "$STEPS"
  # One client holding all training rows, twice the steps a round: the same 3,200 examples.
  step train-central train central 1 $((2 * STEPS)) \
    "strategy.fraction-train=1.0 strategy.min-train-nodes=1"
  touch "$WORK/training-finished"
  step loss-base loss base
  step loss-federated loss federated "$(adapter federated)"
  step loss-central loss central "$(adapter central)"
  step eval-federated-completion evaluate federated-completion completion "$(adapter federated)"
  step eval-federated-chat evaluate federated-chat chat "$(adapter federated)"
) &
(  # chain 2: the base model while training runs, then the centralized adapter
  step eval-base-completion evaluate base-completion completion
  wait_for_training || exit 1
  step eval-central-completion evaluate central-completion completion "$(adapter central)"
  step eval-central-chat evaluate central-chat chat "$(adapter central)"
) &
(  # chain 3: the base in chat mode, then the federated adapter on a 4-bit base, unmerged
  step eval-base-chat evaluate base-chat chat
  wait_for_training || exit 1
  step eval-federated-4bit-humaneval python3 -m fedcoder.cli eval --base "$BASE" \
    --adapter "$(adapter federated)" --quantization 4 --tasks humaneval \
    "${EVAL_FLAGS[@]}" --out "$WORK/eval/federated-4bit-humaneval"
) &
wait
echo "steps:"
cat "$WORK/times.tsv"
