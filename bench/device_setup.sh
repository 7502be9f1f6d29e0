#!/usr/bin/env bash
# Source this on the GPU machine (the `device` tool) before any fedcoder command:
#   . bench/device_setup.sh
# The machine has torch/transformers/peft but no Flower, Ray or bitsandbytes and
# no network, so they travel with the call: `.whl/` (wheels, carried) and
# `.whl-slim/` (Ray and bitsandbytes with the parts fedcoder never loads removed,
# to fit the 64 MiB a call may carry). See docs/performance.md for how they are made.
# Installs once per machine into /tmp/site; later calls on a warm machine reuse it.
if [ ! -f /tmp/site/.fedcoder-ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  for archive in .whl-slim/*.tar.xz; do tar xJf "$archive" -C /tmp/site || return 1; done
  touch /tmp/site/.fedcoder-ready
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
