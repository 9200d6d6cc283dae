"""AdaRound: learned up/down rounding of weights, as BRECQ and Q-Diffusion use it.

Each weight w with scale s gets a continuous variable alpha; the soft rounding offset is the rectified
sigmoid h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) with zeta=1.1, gamma=-0.1, and
the quantized weight is s * (clip(floor(w / s) + h + z, qmin, qmax) - z). Training minimises the
reconstruction error plus reg * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 after a warm-up
of 20% of the iterations (no rounding loss during warm-up); afterwards h is hardened to alpha >= 0.

`AdaRound` plugs into `WeightQuantizer.rounding`, so `WeightQuantizer.grid` returns the learned
codes and `deploy()` packs them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dq.calib.state import quant_state
from dq.errors import DQError
from dq.nn.quantizer import WeightQuantizer
from dq.quant import QuantSpec
from dq.quant.spec import qrange

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Learned rounding of one weight quantizer's [out, in] weight (alpha is the only parameter)."""

    def __init__(self, w2d: torch.Tensor, quantizer: WeightQuantizer) -> None:
        super().__init__()
        if not quantizer.spec.fmt.is_integer:
            raise DQError(
                f"AdaRound learns rounding on an integer grid; weight format {quantizer.spec.format} is a float "
                "format. Use an int weight format for reconstruction recipes."
            )
        s, _ = quantizer.expanded()
        rest = (w2d.detach().float() / s) - torch.floor(w2d.detach().float() / s)
        rest = rest.clamp(1e-4, 1 - 1e-4)  # keep the inverse sigmoid finite
        # alpha such that h(alpha) equals the fractional part: AdaRound's initialisation at nearest-ish
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def offset(self) -> torch.Tensor:
        return self.h() if self.soft else (self.alpha >= 0).float()

    def quantize(self, w2d: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
        """Codes (float, on the grid when hard) of the weight; differentiable in alpha."""
        qmin, qmax = qrange(spec)
        q = torch.floor(w2d.detach() / s) + self.offset() + (0 if z is None else z)
        return torch.clamp(q, qmin, qmax)

    @torch.no_grad()
    def grid(self, w2d: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
        """Hard learned codes: what deploy packs."""
        qmin, qmax = qrange(spec)
        q = torch.floor(w2d / s) + (self.alpha >= 0).float() + (0 if z is None else z)
        return torch.clamp(q, qmin, qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): pushes every h to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class TempDecay:
    """BRECQ's LinearTempDecay: beta = end + (start - end) * max(0, 1 - progress) after the warm-up."""

    def __init__(self, iters: int, warmup: float = 0.2, b_range: tuple[float, float] = (20.0, 2.0)) -> None:
        self.iters, self.start = iters, warmup * iters
        self.b_start, self.b_end = b_range

    def __call__(self, it: int) -> float:
        if it < self.start:
            return self.b_start
        progress = (it - self.start) / max(self.iters - self.start, 1)
        return self.b_end + (self.b_start - self.b_end) * max(0.0, 1.0 - progress)


def weight_quantizers_of(layer: nn.Module) -> list[tuple[WeightQuantizer, torch.Tensor]]:
    """(quantizer, float weight [out, in]) pairs of a simulate-mode layer (two for a split conv)."""
    w = layer._parameters.get("weight")
    if w is None:
        raise DQError(f"{type(layer).__name__} is deployed; reconstruction needs simulate-mode layers.")
    if hasattr(layer, "weight_halves_2d"):
        return list(zip(layer.weight_quantizers(), layer.weight_halves_2d(w)))
    return [(layer.weight_quantizer, w.reshape(layer.weight_2d_shape))]


RECON_LAYER_KINDS = ("linear", "conv2d", "split_conv2d")


def attach_adaround(name: str, layer: nn.Module) -> list[AdaRound]:
    """Give every weight quantizer of `layer` an AdaRound initialised from its current scales."""
    kind = getattr(layer, "kind", type(layer).__name__)
    if kind not in RECON_LAYER_KINDS:
        raise DQError(
            f"layer {name!r} is a {kind!r} layer; AdaRound reconstruction handles {', '.join(RECON_LAYER_KINDS)}. "
            "Skip it in the recipe (`skip`) or use a calibrator without reconstruction."
        )
    roundings = []
    for wq, w2d in weight_quantizers_of(layer):
        r = AdaRound(w2d, wq).to(w2d.device)
        object.__setattr__(wq, "rounding", r)  # a plain attribute: alpha stays out of the state dict
        roundings.append(r)
    return roundings


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """BRECQ's reconstruction loss: |pred - target|^p summed over dim 1, averaged over the rest."""
    d = (pred.float() - target.float()).abs().pow(p)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def rounding_loss(roundings: list[AdaRound], it: int, decay: TempDecay, weight: float) -> torch.Tensor:
    if it < decay.start or not roundings:
        return torch.zeros(())
    beta = decay(it)
    return weight * sum(r.regularizer(beta) for r in roundings)


def harden(roundings: list[AdaRound]) -> None:
    for r in roundings:
        r.soft = False
        r.alpha.requires_grad_(False)


def adaround(
    scope: nn.Module,
    layers: dict[str, nn.Module],
    train_loss: Callable[[], torch.Tensor],
    eval_loss: Callable[[], torch.Tensor],
    iters: int,
    lr: float,
    reg: float,
    warmup: float,
    b_range: tuple[float, float],
    desc: str | None = None,
) -> float:
    """Learn the rounding of `layers`' weights (inside `scope`) by Adam on `train_loss` + the rounding loss.

    Weights are quantized and activations float throughout; the rounding is hardened at the end.
    Returns eval_loss after / eval_loss with nearest rounding (below 1: the learned rounding helps).
    """
    with quant_state(scope, weights=True, acts=False), torch.no_grad():
        nearest = float(eval_loss())
    roundings = [r for name, layer in layers.items() for r in attach_adaround(name, layer)]
    opt = torch.optim.Adam([r.alpha for r in roundings], lr=lr)
    decay = TempDecay(iters, warmup, b_range)
    steps = range(iters) if desc is None else tqdm(range(iters), desc=desc, leave=False)
    with quant_state(scope, weights=True, acts=False), torch.enable_grad():
        for it in steps:
            loss = train_loss() + rounding_loss(roundings, it, decay, reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    harden(roundings)
    with quant_state(scope, weights=True, acts=False), torch.no_grad():
        learned = float(eval_loss())
    return learned / max(nearest, 1e-30)
