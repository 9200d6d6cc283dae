#!/bin/bash
# One device call: GPU correctness check + kernel table + pipeline benchmarks; results land in $OUT.
# usage (device machine): [PIPE=1] [PIPE_RECIPES=...] [PIXART=1] bash benchmarks/gpu_run.sh [kernel-bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xzf .whl/diffusers-0.42.1-py.tar.gz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv
timeout ${KTIME:-420} python3 benchmarks/kernels.py --out $OUT/kernels_h200 "$@" 2>&1 | tee $OUT/kernels_log.txt
# the compiled W4A4 kernels (PTX + cubin) for reading their SASS off the device
find ~/.triton/cache -name "_w4a4_mma8_kernel*" -o -name "_w4_gemm_kernel*" | tar czf $OUT/w4a4_kernels.tgz -T - 2>/dev/null
[ -n "$PIPE" ] && timeout ${PTIME:-240} python3 benchmarks/pipeline.py flux --recipes ${PIPE_RECIPES:-bf16,w8a8,w4a4,w4a4_lr} --out $OUT/pipeline_flux 2>&1 | tee $OUT/pipeline_log.txt
[ -n "$PIXART" ] && timeout 90 python3 benchmarks/pipeline.py pixart --recipes bf16,w8a8,w4a4,w4a4_lr --out $OUT/pipeline_pixart 2>&1 | tee -a $OUT/pipeline_log.txt
exit 0
