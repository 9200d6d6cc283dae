#!/bin/bash
# One device call (at most 8 minutes): the measured kernel choices (dq/kernels/tuned), kernel correctness
# against the reference, the kernel table on FLUX
# shapes, and the FLUX.1-dev and PixArt-Sigma pipeline tables (random weights, 1024x1024, batch 1); results
# (with GPU name, clocks, library versions and date) land in $OUT.
# usage: here `bash benchmarks/gpu_prepare.sh` (the wheels, into .whl/), then on the device machine, with
# carry [".whl"]: bash benchmarks/gpu_run.sh [kernel-bench args...]
#   KTIME/PTIME/XTIME: seconds for the kernel table / FLUX / PixArt (defaults 140 / 180 / 70; the tuning: 80)
#   PIPE_RECIPES: the pipeline recipes (benchmarks/pipeline.py)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels in .whl/: run benchmarks/gpu_prepare.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv | tee $OUT/gpu.txt
RECIPES=${PIPE_RECIPES:-bf16,w8a8_fp8,w4a8_pg,w4a8_pg_lr,w4a4_lr,torchao_fp8}
timeout 80 python3 benchmarks/kernels.py --tune $OUT/tuned 2>&1 | tee $OUT/tune_log.txt   # commit $OUT/tuned/*.json to dq/kernels/tuned/
timeout ${KTIME:-140} python3 benchmarks/kernels.py --quick --out $OUT/kernels_h200 "$@" 2>&1 | tee $OUT/kernels_log.txt
timeout ${PTIME:-180} python3 benchmarks/pipeline.py flux --recipes $RECIPES --out $OUT/pipeline_flux 2>&1 | tee $OUT/pipeline_log.txt
timeout ${XTIME:-70} python3 benchmarks/pipeline.py pixart --recipes $RECIPES --out $OUT/pipeline_pixart 2>&1 | tee -a $OUT/pipeline_log.txt
exit 0
