"""What QuantLinear and QuantConv2d share: quantizers, simulate <-> deploy, and the `weight` view."""

from __future__ import annotations

import torch
from torch import nn

from dq.errors import DQError
from dq.nn.quantizer import ActQuantizer, WeightQuantizer
from dq.quant import QuantSpec
from dq.quant.storage import dequantize_stored, encode_codes, storage_shape_dtype
from dq.sizes import tensor_bytes, tensors_bytes

# Deployed layers keep scales in half precision: 1/32 of a byte per weight at group 64. Progressive weights
# (dq.quant.progressive) keep their integer group scales and zeros in bytes, their channel scales in halves.
SCALE_DTYPE = torch.float16
PROGRESSIVE_GROUP_DTYPE = torch.uint8


def group_param_dtype(quantizer: WeightQuantizer) -> torch.dtype:
    """The stored dtype of a deployed weight's [rows, groups] scales and zero points."""
    return PROGRESSIVE_GROUP_DTYPE if quantizer.progressive else SCALE_DTYPE


class QuantLayerMixin:
    """Mixed into a torch layer. Simulate mode keeps the float `weight` Parameter and fake-quantizes;
    deploy mode replaces it by buffers `qweight` (packed codes), `weight_scale` and `weight_zero` (and, for
    progressive weights, `weight_channel_scale`).
    In deploy mode `layer.weight` still answers, with the dequantized weight, so code that reads
    `.weight.shape` / `.dtype` / `.device` (PEFT, diffusers) keeps working.
    """

    kind: str  # the LayerPlan kind this class is registered under
    weight_quantizer: WeightQuantizer
    act_quantizer: ActQuantizer

    def _init_quantizers(self, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
        out_f, in_f = self.weight_2d_shape
        self.weight_quantizer = WeightQuantizer(weight_spec, out_f, in_f)
        self.act_quantizer = ActQuantizer(act_spec)

    def _adopt(self, module: nn.Module) -> None:
        """Take over the float module's parameters (no copy) and place the quantizers on its device."""
        self._parameters["weight"] = module.weight
        self._parameters["bias"] = module.bias
        self.weight_dtype = module.weight.dtype
        self.weight_quantizer.to(module.weight.device)
        self.act_quantizer.to(module.weight.device)

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None, **options):
        """A simulate-mode copy of `module` (sharing its parameters) with min-max weight scales."""
        layer = cls.wrap(module, weight_spec, act_spec, **options)
        layer.init_weight_scales()
        return layer

    def layer_options(self) -> dict:
        """Kind-specific options that `wrap` needs to rebuild this layer (timestep groups, when used)."""
        groups = self.act_quantizer.groups
        return {"act_groups": groups} if groups > 1 else {}

    def apply_options(self, act_groups: int = 1, **unknown) -> None:
        """Apply the options common to every layer kind (called by `wrap`); unknown ones are errors."""
        if unknown:
            raise DQError(f"{type(self).__name__} got unknown layer option(s) {sorted(unknown)}; allowed: act_groups.")
        if act_groups != 1:
            self.act_quantizer.set_groups(int(act_groups), device=self.weight_quantizer.scale.device)

    # Each layer class defines `weight_shape` (the torch layer's) and `weight_2d_shape` ([out, in]).

    @property
    def deployed(self) -> bool:
        return "weight" not in self._parameters

    @property
    def weight(self) -> torch.Tensor:
        if "weight" in self._parameters:
            return self._parameters["weight"]
        if "qweight" not in self._buffers:
            raise AttributeError("weight")
        return self.dequantized_weight()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        if isinstance(value, nn.Parameter) or "weight" in self._parameters:
            self._parameters["weight"] = value
        else:
            raise DQError("a deployed quantized layer has no float weight to assign; quantize a float model instead.")

    # -- simulate ---------------------------------------------------------------------------
    def init_weight_scales(self) -> None:
        """Round-to-nearest (min-max) weight scales from the current float weight."""
        self.weight_quantizer.init_minmax(self._parameters["weight"].detach().reshape(self.weight_2d_shape))

    def fake_quantized_weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        return self.weight_quantizer(w.reshape(self.weight_2d_shape)).reshape(w.shape)

    # -- deploy -------------------------------------------------------------------------------
    @torch.no_grad()
    def deploy(self) -> None:
        """Pack the weight into integer (or minifloat) codes and drop the float weight. Idempotent."""
        if self.deployed:
            return
        w = self._parameters["weight"]
        grid = self.weight_quantizer.grid(w.detach().reshape(self.weight_2d_shape))
        self.weight_quantizer.rounding = None  # learned rounding (AdaRound) is now baked into the codes
        del self._parameters["weight"]
        self.register_buffer("qweight", encode_codes(grid, self.weight_quantizer.spec.format))
        wq = self.weight_quantizer
        dtype = group_param_dtype(wq)
        self.register_buffer("weight_scale", wq.scale.to(dtype))
        self.register_buffer("weight_zero", None if wq.zero is None else wq.zero.to(dtype))
        self.register_buffer("weight_channel_scale", None if wq.channel_scale is None else wq.channel_scale.to(SCALE_DTYPE))
        # The quantizer's float scales are now carried by weight_scale; keep them out of the state dict.
        wq.scale, wq.zero, wq.channel_scale = None, None, None

    def allocate_deployed(self, device: torch.device | str = "cpu") -> None:
        """Turn a freshly built layer into an empty deploy-mode layer, ready to receive a state dict."""
        out_f, in_f = self.weight_2d_shape
        wq = self.weight_quantizer
        shape, dtype = storage_shape_dtype(wq.spec.format, out_f, in_f)
        del self._parameters["weight"]
        self.register_buffer("qweight", torch.empty(shape, dtype=dtype, device=device))
        group_dtype = group_param_dtype(wq)
        self.register_buffer("weight_scale", torch.empty(tuple(wq.scale.shape), dtype=group_dtype, device=device))
        zero = None if wq.zero is None else torch.empty(tuple(wq.zero.shape), dtype=group_dtype, device=device)
        self.register_buffer("weight_zero", zero)
        channel = None if wq.channel_scale is None else torch.empty(tuple(wq.channel_scale.shape), dtype=SCALE_DTYPE, device=device)
        self.register_buffer("weight_channel_scale", channel)
        wq.scale, wq.zero, wq.channel_scale = None, None, None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the deployed layer computes with it, in the layer's weight dtype and shape."""
        w2d = dequantize_stored(
            self.qweight, self.weight_scale, self.weight_zero, self.weight_quantizer.spec.format, self.weight_2d_shape[1]
        )
        if self.weight_channel_scale is not None:
            w2d = w2d * self.weight_channel_scale.float()
        return w2d.reshape(self.weight_shape).to(self.weight_dtype)

    def quant_repr(self) -> str:
        act = self.act_quantizer.spec.format if self.act_quantizer.enabled else "none"
        mode = "deploy" if self.deployed else "simulate"
        return f"weight={self.weight_quantizer.spec.format}, act={act}, mode={mode}"

    def weight_nbytes(self) -> int:
        """Bytes of the weight as stored (codes + scales in deploy mode, the float tensor otherwise)."""
        if not self.deployed:
            return tensor_bytes(self._parameters["weight"])
        return tensors_bytes([self.qweight, self.weight_scale, self.weight_zero, self.weight_channel_scale])
