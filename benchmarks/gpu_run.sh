#!/bin/bash
# One device call: GPU correctness check + kernel table + pipeline benchmarks; results land in $OUT.
# usage (device machine): bash benchmarks/gpu_run.sh [kernel-bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xzf .whl/diffusers-0.42.1-py.tar.gz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv
timeout 480 python3 benchmarks/kernels.py --out $OUT/kernels_h200 "$@" 2>&1 | tee $OUT/kernels_log.txt
[ -n "$PIPE" ] && timeout 200 python3 benchmarks/pipeline.py flux --recipes bf16,w8a8,w4a16,w4a4,w4a4_lr --out $OUT/pipeline_flux 2>&1 | tee $OUT/pipeline_log.txt
[ -n "$PIPE" ] && timeout 60 python3 benchmarks/pipeline.py pixart --recipes bf16,w8a8,w4a4,w4a4_lr --out $OUT/pipeline_pixart 2>&1 | tee -a $OUT/pipeline_log.txt
