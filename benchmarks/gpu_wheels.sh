#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs that the GPU machines' CUDA image lacks (it has torch,
# transformers, cupy, numpy, pytest, msgpack, hypothesis, prometheus-client...), downloaded into
# .whl/ for CPython 3.12 on x86-64: this checkout's .venv versions where it has them. Run it here,
# where PyPI is reachable; carry .whl along (the device tool's `carry`); gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(msgspec pyzmq starlette uvicorn gguf llguidance jsonschema jsonschema-specifications referencing rpds-py)
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 -d .whl "$name${version:+==$version}"
done
ls .whl
du -sh .whl
