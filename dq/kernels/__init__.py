"""Kernels: Triton on CUDA, torch reference ops on CPU, behind one dispatcher.

Importing this package registers the custom ops torch.ops.dq.{w4_linear, w8a8_linear, w4a8_progressive_linear, w4a16_linear}.
"""

from dq.kernels import ops as _ops  # noqa: F401  (registers the custom ops)
from dq.kernels.dispatch import CUDA_KERNELS, quantized_linear, register_cuda_kernel
from dq.kernels.reference import quantized_linear_reference

__all__ = ["CUDA_KERNELS", "quantized_linear", "quantized_linear_reference", "register_cuda_kernel"]
