"""Quantized layers (simulate and deploy modes) and module swapping."""

from dq.nn.quant_conv import QuantConv2d
from dq.nn.quant_linear import QuantLinear
from dq.nn.quantizer import ActQuantizer, WeightQuantizer
from dq.nn.swap import LayerPlan, QUANT_LAYER_TYPES, deploy_all, quant_layers, swap_layers

__all__ = [
    "ActQuantizer",
    "LayerPlan",
    "QUANT_LAYER_TYPES",
    "QuantConv2d",
    "QuantLinear",
    "WeightQuantizer",
    "deploy_all",
    "quant_layers",
    "swap_layers",
]
