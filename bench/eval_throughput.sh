#!/usr/bin/env bash
# `fedcoder eval` throughput on one GPU with the Phi-4-mini-shaped model (random weights,
# o200k tokenizer; bench/phi4mini.py): all four tasks (986 problems), one sample each,
# at the leaderboard's settings (T=0.2, top-p 0.95, its length limits).
#   1. capped: at most 256 new tokens, more than 95 % of the HumanEval and MBPP reference
#      solutions take (median ~50 tokens): about what a real model's run costs.
#   2. 4-bit: the base in nf4 plus a fedcoder DoRA adapter (unmerged; bench/phi4mini_adapter.py),
#      16 HumanEval problems at 64 new tokens: the quantized path end to end, and its speed.
#   3. full: the leaderboard's limits (1024 tokens, MBPP 2048). Random weights never emit
#      EOS or a stop string, so every sequence runs to its limit: the worst case. First one
#      batch of each length (HumanEval's 164 problems; MBPP's first BATCH_SIZE), whose times
#      give the whole run's if it cannot be afforded, then the whole run.
#
#   bash bench/eval_throughput.sh DATA_DIR TOKENIZER_DIR WORK_DIR [BATCH_SIZE]
#
# TOKENIZER_DIR: the o200k tokenizer (bench/build_o200k_tokenizer.py). The model goes to
# /tmp/phi4mini_random unless MODEL is set; an existing one is reused.
# WORK_DIR/times.tsv gets each run's wall time; WORK_DIR/logs/ each run's log, with one
# line per generated batch (sequences x steps, seconds, tokens/s).
set -u
USAGE="usage: eval_throughput.sh DATA_DIR TOKENIZER_DIR WORK_DIR [BATCH_SIZE]"
DATA=$(realpath "${1:?$USAGE}")
TOKENIZER=$(realpath "${2:?$USAGE}")
WORK=$(realpath -m "${3:?$USAGE}")
MODEL=${MODEL:-/tmp/phi4mini_random}
# 168 rows: MBPP's 500 in three batches, each other task in one. The KV cache of
# 168 x 2048 tokens is 45 GB, which fits beside the 7.7 GB of bf16 weights on 80 GB.
BATCH=${4:-168}
# shellcheck disable=SC2206  # EVAL_EXTRA is meant to split into flags (dry runs: --limit 2)
COMMON=(--data-dir "$DATA" --batch-size "$BATCH" ${EVAL_EXTRA:-})
mkdir -p "$WORK/logs"

. "$(dirname "$0")/timed.sh"

timed model python3 bench/phi4mini.py --tokenizer "$TOKENIZER" "$MODEL" || exit 1
timed adapter python3 bench/phi4mini_adapter.py "$MODEL" "$WORK/adapter" || exit 1
timed capped python3 -m fedcoder.cli eval --base "$MODEL" "${COMMON[@]}" \
  --max-new-tokens 256 --out "$WORK/eval-capped"
timed 4bit-adapter python3 -m fedcoder.cli eval --base "$MODEL" --adapter "$WORK/adapter" \
  --quantization 4 --tasks humaneval --limit 16 --max-new-tokens 64 --data-dir "$DATA" \
  --batch-size 16 --out "$WORK/eval-4bit-adapter"
timed full-humaneval python3 -m fedcoder.cli eval --base "$MODEL" "${COMMON[@]}" \
  --tasks humaneval --out "$WORK/eval-full-humaneval"
timed full-mbpp-batch python3 -m fedcoder.cli eval --base "$MODEL" "${COMMON[@]}" \
  --tasks mbpp --limit "$BATCH" --out "$WORK/eval-full-mbpp-batch"
timed full python3 -m fedcoder.cli eval --base "$MODEL" "${COMMON[@]}" --out "$WORK/eval-full"
grep -h "generated" "$WORK"/logs/*.log | tail -n 20
cat "$WORK/times.tsv"
