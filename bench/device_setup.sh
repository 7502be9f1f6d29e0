#!/usr/bin/env bash
# Source this on the GPU machine (the `device` tool) before any fedcoder command:
#   . bench/device_setup.sh
# The machine has torch/transformers/peft but no Flower, Ray or bitsandbytes and
# no network, so they travel with the call: `.whl/` (wheels, carried) and
# `.whl-slim/` (Ray and bitsandbytes with the parts fedcoder never loads removed,
# to fit the 64 MiB a call may carry), both made by bench/device_wheels.sh.
# Installs into /tmp/site, each archive once per machine, whichever of the two folders
# a call carries: on a warm machine, consecutive calls can bring them in turn.
mkdir -p /tmp/site
wheels=()
for wheel in .whl/*.whl; do
  [ -f "$wheel" ] && [ ! -f "/tmp/site/.installed-${wheel##*/}" ] && wheels+=("$wheel")
done
if [ ${#wheels[@]} -gt 0 ]; then
  # Into a fresh folder, then merged: pip's --target --upgrade replaces whole folders
  # such as bin/, which would drop the scripts (flower-superlink) of an earlier call.
  staged=$(mktemp -d /tmp/site-staged.XXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$staged" "${wheels[@]}" || return 1
  # Byte-compiled once here (pip's own compile is off, it is slower): otherwise every
  # process of a run compiles what it imports, which cost a fresh machine about 30 s of
  # Flower start-up (docs/performance.md, fifth session).
  python3 -m compileall -q -j 0 "$staged" >/dev/null
  cp -a "$staged/." /tmp/site/ && rm -rf "$staged"
  for wheel in "${wheels[@]}"; do touch "/tmp/site/.installed-${wheel##*/}"; done
fi
for archive in .whl-slim/*.tar.xz; do
  [ -f "$archive" ] && [ ! -f "/tmp/site/.installed-${archive##*/}" ] || continue
  tar xJf "$archive" -C /tmp/site && touch "/tmp/site/.installed-${archive##*/}" || return 1
done
# The image's own packages (torch, transformers, PEFT) come without byte-code, and the
# image sets PYTHONDONTWRITEBYTECODE, so every process compiled torch's Python again on
# import: a worker's imports took 16.5 s, against 7.4-8.0 s with byte-code (H200 machine,
# docs/performance.md, ninth session). pip install compiles them, so this is what a
# user's environment has. Once per machine.
if [ ! -f /tmp/site/.compiled-image ]; then
  image=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m compileall -q -j 0 "$image" >/dev/null 2>&1
  touch /tmp/site/.compiled-image
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
