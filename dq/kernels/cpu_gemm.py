"""Which GEMM runs the INT8 x INT8 products on this CPU: the integer kernel or FP32 after dequantization.

`torch._int_mm` is fast on CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX) and
10-50x slower than the FP32 GEMM on CPUs without them (AVX2 only: no VNNI). Whether this CPU has a fast one
is decided once per process and logged at INFO:

    DQ_CPU_INT8_GEMM=1 / =0     forces the integer / the FP32 path (at every size);
    no VNNI/AMX flag            FP32 (nothing to probe: the integer kernel has no fast instruction);
    otherwise                   a measured probe (about 10 ms) picks the faster of the two.

Where it is fast, it pays only for large products (`int8_gemm_pays`): below INT8_GEMM_MIN_ROWS rows or
INT8_GEMM_MIN_MACS multiply-adds its fixed costs (the input's INT32 result, the rescaling) lose to dq's
one-call float path (benchmarks/cpu_layers.py: on an AVX-512 VNNI EPYC 0.38-0.60x the FP32 layer's time at
M >= 512; on an AMX Xeon 0.57-0.91x at M >= 256, where the float path took 1.03-1.17x, but 1.25x at
128x1280x1280 against its 1.22x; slower than the float form at K = N = 64 and at M = 32 on both).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ENV_VAR = "DQ_CPU_INT8_GEMM"
INT8_GEMM_MIN_ROWS = 256
INT8_GEMM_MIN_MACS = 2**24


def cpu_flags() -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where the file is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def probe_int8_gemm(m: int = 128, k: int = 512, n: int = 256) -> tuple[float, float]:
    """Seconds of one [m, k] x [k, n] product: (torch._int_mm on INT8, FP32 GEMM including the conversion)."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    t_int = _best_seconds(lambda: torch._int_mm(a, b))
    t_float = _best_seconds(lambda: a.float() @ b.float())
    return t_int, t_float


def forced_int8_gemm() -> bool | None:
    """True / False where DQ_CPU_INT8_GEMM forces the integer / the float form, else None."""
    value = os.environ.get(ENV_VAR)
    return value == "1" if value in ("0", "1") else None


@functools.cache
def int8_gemm_is_fast() -> bool:
    """True when this CPU should run INT8 x INT8 layers through torch._int_mm (decided once per process)."""
    forced = forced_int8_gemm()
    flags = cpu_flags() & set(INT8_DOT_FLAGS)
    capability = torch.backends.cpu.get_cpu_capability()
    if forced is not None:
        fast, why = forced, f"{ENV_VAR}={int(forced)}"
    elif not flags and cpu_flags():
        fast, why = False, f"no {'/'.join(INT8_DOT_FLAGS)} flag"
    else:
        t_int, t_float = probe_int8_gemm()
        fast, why = t_int < t_float, f"probe: int8 {t_int * 1e3:.2f} ms vs fp32 {t_float * 1e3:.2f} ms"
    path = "integer torch._int_mm" if fast else "dequantize to FP32 + FP32 GEMM"
    logger.info("dq CPU path for INT8 x INT8 layers: %s (%s; CPU capability %s)", path, why, capability)
    return fast


def int8_gemm_pays(m: int, k: int, n: int) -> bool:
    """Whether an [m, k] x [k, n] INT8 x INT8 product runs through torch._int_mm on this CPU: forced by
    DQ_CPU_INT8_GEMM, else where the integer GEMM is fast here and the product is large enough."""
    forced = forced_int8_gemm()
    if forced is not None:
        return forced
    return m >= INT8_GEMM_MIN_ROWS and m * k * n >= INT8_GEMM_MIN_MACS and int8_gemm_is_fast()
