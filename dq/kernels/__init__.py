"""Kernels: Triton on CUDA, torch reference ops on CPU, behind one dispatcher."""

from dq.kernels.dispatch import CUDA_KERNELS, quantized_linear
from dq.kernels.reference import quantized_linear_reference

__all__ = ["CUDA_KERNELS", "quantized_linear", "quantized_linear_reference"]
