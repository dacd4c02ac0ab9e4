#!/usr/bin/env bash
# The GPU check in one command, for an H100/H200 machine with the CUDA image (torch, cupy, numpy,
# pytest, msgpack present): installs the carried wheels (.whl/, from benchmarks/gpu_wheels.sh), then
# runs benchmarks/gpu_check.py: the kernel tests on CUDA, the executor on the cuda backend against
# the torch backend and HF, the attention benchmark and an fp16 end-to-end comparison, within
# 8 minutes. Results: <out>/gpu_check.json and gpu_check.md (out: $1, else $OUT, else gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 -m benchmarks.gpu_check --out "$out"
