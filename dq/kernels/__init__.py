"""Kernels: Triton on CUDA, torch reference ops on CPU, behind one dispatcher.

Importing this package registers the custom ops torch.ops.dq.{w4_linear, w8a8_linear, w4a8_progressive_linear, w4a16_linear}.
"""

from dq.kernels import ops as _ops  # noqa: F401  (registers the custom ops)
from dq.kernels.dispatch import LAUNCHERS, quantized_linear
from dq.kernels.reference import quantized_linear_reference
from dq.kernels.scheme import KernelScheme, kernel_scheme

__all__ = ["KernelScheme", "LAUNCHERS", "kernel_scheme", "quantized_linear", "quantized_linear_reference"]
