"""QuantLinear: an nn.Linear whose weight and input are quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.kernels import kernel_scheme, quantized_linear
from dq.kernels.cpu_linear import cpu_linear
from dq.nn.base import QuantLayerMixin
from dq.quant import QuantSpec


class QuantLinear(QuantLayerMixin, nn.Linear):
    """nn.Linear with a weight quantizer and an input-activation quantizer.

    Example:
        >>> from dq.quant import QuantSpec, PerGroup
        >>> layer = QuantLinear.from_float(nn.Linear(128, 64), QuantSpec("int4", PerGroup(64)), None)
        >>> layer.deploy()      # packed INT4 codes + fp16 scales; forward runs through dq.kernels
        >>> y = layer(torch.randn(2, 128))
    """

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(weight_spec, act_spec)

    @classmethod
    def wrap(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None, **options) -> "QuantLinear":
        """A QuantLinear sharing `linear`'s parameters (weight scales not yet set)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec, device="meta")
        layer._adopt(linear)
        layer.apply_options(**options)
        return layer

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def weight_2d_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deployed:
            return F.linear(self.act_quantizer(x), self.fake_quantized_weight(), self.bias)
        if self.act_quantizer.static:
            # Calibrated (static, possibly per-timestep) scales live in the quantizer, not the kernel.
            x = self.act_quantizer(x)
        return self.deployed_linear(x, self.bias)

    def deployed_linear(self, x: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None,
                        lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None) -> torch.Tensor:
        """The deployed layer's kernel call on x (already quantized by a static quantizer): dq's C kernels on the
        CPU where the scheme has a CPU plan (dq.kernels.cpu_linear), else dq.kernels.quantized_linear."""
        b, scheme = self._buffers, self.kernel_scheme  # buffers read once: module attribute lookups cost microseconds
        qweight, scale, zero, channel = b["qweight"], b["weight_scale"], b["weight_zero"], b["weight_channel_scale"]
        if scheme.cpu is not None and not x.is_cuda:
            y = cpu_linear(x, qweight, scale, zero, channel, bias, smooth, lora_down, lora_up, scheme.cpu, self.in_features)
            if y is not None:
                return y
        return quantized_linear(
            x, qweight, scale, zero, bias, weight_format=self.weight_quantizer.spec.format, in_features=self.in_features,
            act_spec=self.kernel_act_spec(), smooth=smooth, lora_down=lora_down, lora_up=lora_up, channel_scale=channel,
            scheme=scheme,
        )

    # -- deploy ---------------------------------------------------------------------------------------
    def deploy(self) -> None:
        super().deploy()
        self._decide_kernel()

    def allocate_deployed(self, device: torch.device | str = "cpu") -> None:
        super().allocate_deployed(device)
        self._decide_kernel()

    def kernel_act_spec(self) -> QuantSpec | None:
        """The activation spec the kernel sees: None when a static quantizer quantizes the input before it."""
        return None if self.act_quantizer.static else self.act_quantizer.spec

    def _decide_kernel(self) -> None:
        """Fix the layer's kernel scheme (dq.kernels.scheme) from its stored tensors: once, when deployed or allocated."""
        self.kernel_scheme = kernel_scheme(self.weight_quantizer.spec.format, self.qweight, self.weight_scale, self.weight_zero,
                                           self.weight_channel_scale, self.in_features, self.kernel_act_spec())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"
