"""Quantized layers (simulate and deploy modes) and module swapping."""

from dq.nn.quant_conv import QuantConv2d
from dq.nn.quant_linear import QuantLinear
from dq.nn.quantizer import ActQuantizer, WeightQuantizer
from dq.nn.split_conv import QuantSplitConv2d  # registers the "split_conv2d" layer kind
from dq.nn.svdq_linear import SVDQLinear  # registers kind "svdq_linear" in QUANT_LAYER_TYPES
from dq.nn.swap import QUANT_LAYER_TYPES, LayerPlan, deploy_all, plan_of, quant_layers, swap_layers

__all__ = [
    "ActQuantizer",
    "LayerPlan",
    "QUANT_LAYER_TYPES",
    "QuantConv2d",
    "QuantLinear",
    "QuantSplitConv2d",
    "SVDQLinear",
    "WeightQuantizer",
    "deploy_all",
    "plan_of",
    "quant_layers",
    "swap_layers",
]
