"""Range observers: turn observed values into (scale, zero) for a QuantSpec.

- minmax: the observed min and max.
- percentile: the p-th and (1-p)-th percentiles (clips rare outliers).
- mse / lp: search the clipping range that minimises the Lp quantization error, shrinking the
  min-max range in 1% steps over 80 candidates as Q-Diffusion's (BRECQ's) 'mse' scale method does;
  "lp" uses p=2.4 (Q-Diffusion's exponent), "mse" p=2 (PTQ4DM/QDrop).

Observers work per group of the spec's granularity (`spec.granularity.grouped`), so one class serves
per-channel / per-group weights (`weight_scales`) and per-tensor activations streamed over batches.
"""

from __future__ import annotations

import torch

from dq.errors import DQError
from dq.quant import PerTensor, QuantSpec, grid_ste, scales_from_range
from dq.registry import Registry

OBSERVERS: Registry[type["Observer"]] = Registry("observer")
_RESERVOIR = 2**16  # activation values kept per observer for percentile / Lp search


def fake_quant_grouped(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize values in a grouped view with per-group scale and zero (no gradient)."""
    return (grid_ste(g / scale + zero, spec) - zero) * scale


class Observer:
    """Accumulates values of one tensor (weights at once, activations over batches)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.lo is None

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic or isinstance(self.spec.granularity, PerTensor):
            return x.detach().float().reshape(1, -1)
        return self.spec.granularity.grouped(x.detach().float())

    def update(self, x: torch.Tensor) -> None:
        g = self._grouped(x)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.empty:
            raise DQError("the observer saw no values; run calibration data through the layer first.")
        return self.lo, self.hi

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) in the grouped shape."""
        lo, hi = self.range()
        return scales_from_range(lo, hi, self.spec)


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Scales from the running min and max."""


class _SampledObserver(Observer):
    """Keeps a bounded random subsample of the values (per-tensor) or all values (one weight update)."""

    def __init__(self, spec: QuantSpec, max_values: int = _RESERVOIR) -> None:
        super().__init__(spec)
        self.max_values = max_values
        self.values: list[torch.Tensor] = []
        self.count = 0
        self._gen = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        g = self._grouped(x)
        if g.shape[0] != 1 or g.dim() != 2:  # per-channel weights: seen once, keep them whole
            self.values = [g]
            return
        flat = g.reshape(-1).cpu()
        self.count += flat.numel()
        per_batch = max(self.max_values // 16, 1)
        if flat.numel() > per_batch:
            flat = flat[torch.randint(flat.numel(), (per_batch,), generator=self._gen)]
        self.values.append(flat)
        kept = sum(v.numel() for v in self.values)
        if kept > self.max_values:
            pool = torch.cat(self.values)
            self.values = [pool[torch.randperm(pool.numel(), generator=self._gen)[: self.max_values]]]

    def data(self) -> torch.Tensor:
        if len(self.values) == 1 and self.values[0].dim() > 2:
            return self.values[0]
        return torch.cat([v.reshape(-1) for v in self.values]).reshape(1, -1).to(self.lo.device)


@OBSERVERS.register("percentile")
class PercentileObserver(_SampledObserver):
    """Clip to the `percentile`-th quantiles of the observed values (default 99.99%)."""

    def __init__(self, spec: QuantSpec, percentile: float = 0.9999, max_values: int = _RESERVOIR) -> None:
        super().__init__(spec, max_values)
        if not 0.5 < percentile <= 1.0:
            raise DQError(f"percentile must lie in (0.5, 1], got {percentile}.")
        self.percentile = percentile

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.range()
        v = self.data()
        lo = torch.quantile(v, 1 - self.percentile, dim=-1, keepdim=True)
        hi = torch.quantile(v, self.percentile, dim=-1, keepdim=True)
        return scales_from_range(lo, hi, self.spec)


@OBSERVERS.register("lp")
class LpObserver(_SampledObserver):
    """Search the clipping range minimising sum |x - Q(x)|^p (Q-Diffusion: p=2.4, 80 candidates of 1%)."""

    default_p = 2.4

    def __init__(self, spec: QuantSpec, p: float | None = None, candidates: int = 80, max_values: int = _RESERVOIR) -> None:
        super().__init__(spec, max_values)
        self.p = self.default_p if p is None else float(p)
        self.candidates = candidates

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return lp_search(self.data(), lo, hi, self.spec, self.p, self.candidates)


@OBSERVERS.register("mse")
class MSEObserver(LpObserver):
    """The Lp search with p=2 (mean squared error), as PTQ4DM/QDrop's 'mse' scale method."""

    default_p = 2.0


def lp_search(
    g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, p: float = 2.4, candidates: int = 80
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the shrunk range (1 - 0.01 i) * [lo, hi], i < candidates, with the least Lp error.

    g: values in the grouped view [..., n]; lo, hi: the per-group min and max [..., 1].
    """
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = scales_from_range(lo, hi, spec)
    with _single_thread(g):
        for i in range(candidates):
            f = 1.0 - 0.01 * i
            scale, zero = scales_from_range(lo * f, hi * f, spec)
            err = (g - fake_quant_grouped(g, scale, zero, spec)).abs().pow(p).sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class _single_thread:
    """Run small CPU element-wise loops on one thread: on shared cores OpenMP's barriers cost more
    than the work (torch.round on 64k values: 0.007 ms on one thread, ~2 ms on two busy ones)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.active = t.device.type == "cpu" and t.numel() <= 2**22

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.saved)


@torch.no_grad()
def weight_scales(w2d: torch.Tensor, spec: QuantSpec, observer: str = "minmax", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of a weight flattened to [out, in], shaped [rows, groups] like WeightQuantizer's.

    Example:
        >>> s, z = weight_scales(layer.weight.reshape(64, -1), QuantSpec("int4", PerChannel()), "lp")
    """
    obs = OBSERVERS.get(observer)(spec, **options)
    obs.update(w2d)
    scale, zero = obs.compute()
    rows = 1 if isinstance(spec.granularity, PerTensor) else w2d.shape[0]
    return scale.reshape(rows, -1), zero.reshape(rows, -1)


def set_weight_scales(quantizer, w2d: torch.Tensor, observer: str = "minmax", **options) -> None:
    """Set a WeightQuantizer's scale (and zero) from the named observer."""
    scale, zero = weight_scales(w2d, quantizer.spec, observer, **options)
    quantizer.scale = scale.reshape(quantizer.scale.shape).to(quantizer.scale.device)
    if quantizer.zero is not None:
        quantizer.zero = zero.reshape(quantizer.zero.shape).to(quantizer.scale.device)
