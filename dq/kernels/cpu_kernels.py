"""dq's CPU kernels (cpu_kernels.c): a deployed layer's element-wise passes, one call each, and for linear
layers the whole layer in one call, GEMMs included (through the BLAS sgemm torch calls itself).

A deployed CPU layer quantizes its input and expands its packed weight on every call.
In torch ops that is 10-25 dispatches per layer, several microseconds each: on a small model (the bundled
ref-sd, 32-128 channels per layer) more time than the layer's GEMM. The C functions here compute the same
float32 values, bit for bit (tests/kernels/test_cpu_kernels.py), in one call and one pass each.

The library is compiled on first use with the system C compiler, as Triton compiles its launchers, and
kept in ~/.cache/dq (or $DQ_CACHE_DIR), keyed by the source, the flags and the CPU's feature flags; a
process compiles it at most once (under a second). Without a compiler, or with DQ_CPU_KERNELS=0, every
caller falls back to the torch ops (logged once at INFO).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dq.kernels.cpu_gemm import cpu_flags
from dq.quant import PerToken, QuantSpec
from dq.quant.formats import IntFormat, get_format
from dq.quant.spec import scales_are_absmax

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENV_VAR = "DQ_CPU_KERNELS"
# No contraction into fused multiply-adds and no fast-math: the C code must round as torch's ops round.
# -fopenmp: the parallel loops share torch's OpenMP runtime (same soname, libgomp.so.1, already loaded by torch).
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.uint8: 2, torch.bfloat16: 3}  # as cpu_kernels.c reads them

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "dq_quantize_rows": (_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _f32, _ptr),
    "dq_quantize_channels": (_ptr, _i64, _i64, _i64, _i64, _f32, _ptr),
    "dq_decode_weight": (_ptr, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _int, _i64, _i64, _ptr, _ptr),
    "dq_set_sgemm": (_ptr,),
    "dq_linear": (_ptr, _i64, _i64, _i64, _ptr, _int, _ptr, _ptr, _i64, _f32, _ptr,
                  _ptr, _i64, _i64, _int, _int, _ptr, _ptr, _int, _i64, _i64, _ptr, _ptr, _ptr,
                  _ptr, _ptr, _int, _i64, _ptr, _ptr, _ptr, _ptr),
    "dq_conv_operands": (_ptr, _i64, _i64, _i64, _i64, _f32, _ptr,
                         _ptr, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _int, _i64, _i64, _ptr, _ptr),
}


def cache_dir() -> Path:
    """Where the compiled library is kept: $DQ_CACHE_DIR, else $XDG_CACHE_HOME/dq, else ~/.cache/dq."""
    root = os.environ.get("DQ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dq"
    return Path(root) / "cpu-kernels"


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library into `target` atomically (a concurrent process may build the same file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (decided once per process, logged at INFO)."""
    if os.environ.get(ENV_VAR) == "0":
        logger.info("dq CPU kernels off (%s=0): deployed CPU layers use torch ops", ENV_VAR)
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("dq CPU kernels unavailable (no C compiler; set CC): deployed CPU layers use torch ops")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(CFLAGS).encode(), compiler.encode(),
                                     " ".join(sorted(cpu_flags())).encode()])).hexdigest()[:16]
    path = cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        logger.info("dq CPU kernels unavailable (%s): deployed CPU layers use torch ops", str(detail).strip()[:500])
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    logger.info("dq CPU kernels: %s", path)
    return lib


def linear_library() -> ctypes.CDLL | None:
    """library() with its GEMM bound to the BLAS sgemm that torch's F.linear calls, or None where there is no
    library or torch exports no sgemm (then deployed linear layers use torch ops; logged once at INFO).

    The whole layer is then one C call (dq_linear): at 64-256 channels the dispatches of the torch calls
    around the GEMMs cost as much as the GEMMs (benchmarks/cpu_layers.py)."""
    lib = library()
    return lib if lib is not None and _bind_sgemm(lib) else None


@functools.cache
def _bind_sgemm(lib: ctypes.CDLL) -> bool:
    sgemm = torch_sgemm()
    if sgemm is None:
        logger.info("dq CPU kernels: torch exports no BLAS sgemm; deployed linear layers use torch ops")
        return False
    lib.dq_set_sgemm(sgemm)
    return True


def torch_sgemm() -> int | None:
    """The address of the Fortran BLAS sgemm_ in torch's CPU library (MKL in the x86 wheels), or None."""
    try:
        return ctypes.cast(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def pointer(t: torch.Tensor | None) -> int | None:
    """t's data pointer for a C argument; None (NULL) for None."""
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class CpuPlan:
    """What the C kernels need to know of a deployed layer (dq.kernels.cpu_linear, QuantConv2d), decided when it
    is deployed: the stored codes' width and sign, the scales' dtype code, and the activation quantization
    (input channels per scale, largest code; act_qmax 0: the input is not quantized). int8_product: the layer
    is an exact INT8 x INT8 product (dq.kernels.reference.uses_int_mm), which the torch ops' integer GEMM runs
    where it pays (dq.kernels.cpu_gemm.int8_gemm_pays)."""

    bits: int
    signed: bool
    scale_dtype: int
    act_group: int
    act_qmax: float
    int8_product: bool = False


def cpu_plan(weight_format: str, weight_scale: torch.Tensor, channel_scale: torch.Tensor | None, in_channels: int,
             act_spec: QuantSpec | None) -> CpuPlan | None:
    """The CpuPlan of a deployed layer with `in_channels` input channels (a linear layer's in_features), or None
    where the C kernels do not take it (then the torch ops run)."""
    if not takes_weight(weight_format, weight_scale, channel_scale):
        return None
    act = (0, 0.0) if act_spec is None else row_quantization(act_spec)
    if act is None:
        return None
    fmt = get_format(weight_format)
    group, qmax = act
    return CpuPlan(8 if fmt.bits > 4 else 4, fmt.signed, DTYPE_CODES[weight_scale.dtype], group or in_channels, qmax)


def takes_weight(weight_format: str, scale: torch.Tensor, channel_scale: torch.Tensor | None) -> bool:
    """True when decode_weight expands this stored weight: integer codes, scales in DTYPE_CODES, float16 s1."""
    return (isinstance(get_format(weight_format), IntFormat) and scale.dtype in DTYPE_CODES
            and (channel_scale is None or channel_scale.dtype == torch.float16))


def takes(*tensors: torch.Tensor | None) -> bool:
    """True when the C kernels can run on these tensors: on the CPU, outside autograd, with the library built."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors) and library() is not None


@functools.cache
def row_quantization(spec: QuantSpec | None) -> tuple[int | None, float] | None:
    """(group size or None for one scale per token, largest code) when the C kernels quantize this dynamic
    activation spec (symmetric absmax scales onto a signed integer grid), else None."""
    if spec is None or not isinstance(spec.granularity, PerToken) or not isinstance(spec.fmt, IntFormat):
        return None
    if not (spec.fmt.signed and scales_are_absmax(spec)):
        return None
    return spec.granularity.group_size, float(spec.fmt.qmax)


def quantize_rows(
    x2: torch.Tensor, group: int | None, qmax: float, out: torch.Tensor, smooth: torch.Tensor | None = None,
    smoothed: torch.Tensor | None = None,
) -> None:
    """Fake-quantize float32 x2 [m, k] (last dim contiguous) per row, or per row and group, into `out` [m, k]
    (see dq_quantize_rows). smooth [k] (float32): x2 / smooth is quantized; `smoothed` [m, k] receives it."""
    m, k = x2.shape
    library().dq_quantize_rows(x2.data_ptr(), m, k, x2.stride(0), pointer(smooth), pointer(smoothed), group or k, qmax, out.data_ptr())


def quantize_channels(x: torch.Tensor, group: int | None, qmax: float, out: torch.Tensor) -> None:
    """Fake-quantize contiguous float32 x [n, c, *spatial] per pixel (and group of channels) into `out`."""
    n, c = x.shape[:2]
    library().dq_quantize_channels(x.data_ptr(), n, c, math.prod(x.shape[2:]), group or c, qmax, out.data_ptr())


def decode_weight(
    qweight: torch.Tensor, bits: int, signed: bool, in_features: int, out: torch.Tensor, scale: torch.Tensor,
    zero: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None,
) -> None:
    """Stored codes [n, stored columns] -> float32 out [n, in_features] = (code - zero) * scale, with [rows, groups]
    scale (and zero) of one dtype in DTYPE_CODES, times the float16 channel_scale [n] when given (dq_decode_weight)."""
    rows, groups = scale.shape
    library().dq_decode_weight(qweight.data_ptr(), qweight.shape[0], in_features, qweight.stride(0), 8 if bits > 4 else 4,
                               int(signed), scale.data_ptr(), pointer(zero), DTYPE_CODES[scale.dtype], rows, groups,
                               pointer(channel_scale), out.data_ptr())
