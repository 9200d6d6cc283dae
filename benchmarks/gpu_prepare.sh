#!/bin/bash
# Run here, before the device call: download the wheels the device image lacks (diffusers, and torchao for
# the peers) into .whl/ (git-ignored), for the device's Python 3.12 on x86-64. Then one call runs
# benchmarks/gpu_run.sh with carry [".whl"]; see benchmarks/KERNELS_NOTES.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=$(python3 -c "import re, tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(next(x for x in d if re.match('diffusers==', x)))")
TORCHAO=${TORCHAO:-torchao==0.18.0}   # torchao's prebuilt ops need torch >= 2.11 (the image had 2.11); older torch skips them
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$DIFFUSERS" "$TORCHAO" 2>&1 | grep -v '^WARNING: Location' || true
ls .whl/diffusers-*.whl .whl/torchao-*.whl   # fails when either is missing
du -sh .whl
