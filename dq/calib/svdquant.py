"""The "svdquant" and "smoothquant" calibrators.

SVDQuant (Li et al., 2024; deepcompressor's ptq order): smoothing -> low-rank SVD of the smoothed
weight -> quantize the residual (optionally with GPTQ) -> dynamic activation quantizers. Per layer:

    1. capture the layer's inputs from the unquantized model (a token subsample + channel max |X|),
    2. search the smoothing strength on a grid, each candidate scored by the layer-output MSE with the
       rank-r branch and both quantizers in the loop (randomized SVD per candidate keeps this fast),
    3. install s, the 16-bit branch and the residual in the SVDQLinear; GPTQ-round the residual if asked.

"smoothquant" is the same machinery with rank 0 and a fixed alpha (the SmoothQuant baseline).

The method also plans the layers (`plan_layers`, called by dq.quantize before swapping): Linear layers
become "svdq_linear"; adaLN modulation linears run weight-only; with `act_shift`, fc2 after a GELU gets
an unsigned activation format.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from dq.calib.base import Calibrator, CalibratorConfig, Sampling, register_calibrator
from dq.calib.data import FLOAT, CalibData, CalibSample
from dq.calib.gptq import gptq_quantize
from dq.calib.smooth import LayerInputs, alpha_beta_grid, capture_layer_inputs, first_guess_alpha, search_smoothing
from dq.errors import DQError
from dq.nn import LayerPlan, SVDQLinear
from dq.nn.base import QuantLayerMixin
from dq.nn.select import LayerSelection
from dq.quant import QuantSpec, fake_quantize
from dq.quant.lowrank import LowRank, SVDMethod, low_rank, refine_low_rank, shared_low_rank

if TYPE_CHECKING:
    from dq.recipes import Recipe

logger = logging.getLogger(__name__)

# adaLN modulation linears (per-block norm1.linear of Flux/SD3, PixArt's adaln_single.linear): SVDQuant
# keeps their activations in 16 bits and quantizes the weights only (W4A16).
ADALN_PATTERNS = ("adaln_single.linear", "*blocks.*.norm1.linear", "*blocks.*.norm1_context.linear", "*blocks.*.norm.linear")
# The smallest value of tanh-GELU is -0.1700; nunchaku shifts fc2's input by 0.171875 (exact in fp16).
GELU_SHIFT = 0.171875


class Smoothing(str, Enum):
    """How the smoothing strength alpha (and beta = 1 - alpha) is chosen."""

    SEARCH = "search"
    """Grid search over alpha = k / num_grids, scored by the layer's output error (deepcompressor)."""
    FIXED = "fixed"
    """Use `alpha` (default: the closed-form first guess b_w / (b_w + b_x))."""
    NONE = "none"
    """No smoothing."""


class BranchDType(str, Enum):
    """The dtype of the low-rank branch."""

    AUTO = "auto"
    """bfloat16 for bfloat16 models, else float16."""
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


@dataclass(frozen=True)
class SVDQuantConfig(CalibratorConfig):
    """SVDQuant: smoothing, a 16-bit low-rank branch, and the 4-bit residual (recipe `options`).

    Args:
        rank: low-rank branch rank r (0: smoothing only).
        svd: the SVD of the smoothed weight (randomized torch.svd_lowrank, or exact float64).
        svd_niter: power iterations of the randomized SVD.
        lowrank_iters: re-fits of the branch against the quantized residual (0: plain SVD).
        smooth, alpha: how the smoothing strength is chosen; beta = 1 - alpha.
        num_grids: alpha grid points k / num_grids (deepcompressor uses 20).
        search_beta: also score beta = 0 candidates.
        max_tokens: calibration tokens kept per layer (final error, GPTQ Hessian, the re-scoring of the best).
        search_tokens: tokens the whole grid is scored on; the `search_top` best candidates are then
            re-scored on all `max_tokens` (a cheap proxy, verified: the main speed-up over scoring every
            candidate on every token with an exact SVD).
        gptq: GPTQ-round the residual; gptq_blocksize, gptq_damp as in the GPTQ reference.
        shared_lowrank: layers reading the same input (q, k, v) share one smoothing and down-projection.
        act_shift: quantize fc2's post-GELU input unsigned, shifted by 0.171875 (folded into the bias).
        adaln_weight_only: quantize adaLN modulation linears weight-only instead of keeping them 16-bit.
        branch_dtype: the dtype of the low-rank branch.
        batch_size: calibration samples per replayed denoiser call.
    """

    method: ClassVar[str] = "svdquant"
    sampling: ClassVar[Sampling | None] = Sampling.UNIFORM
    rank: int = 32
    svd: SVDMethod = SVDMethod.RANDOMIZED
    svd_niter: int = 4
    lowrank_iters: int = 0
    smooth: Smoothing = Smoothing.SEARCH
    alpha: float | None = None
    num_grids: int = 20
    search_beta: bool = False
    max_tokens: int = 2048
    search_tokens: int = 256
    search_top: int = 3
    gptq: bool = False
    gptq_blocksize: int = 128
    gptq_damp: float = 0.01
    shared_lowrank: bool = False
    act_shift: bool = False
    adaln_weight_only: bool = True
    branch_dtype: BranchDType = BranchDType.AUTO
    batch_size: int = 8

    def validate(self) -> None:
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise DQError(f"option alpha={self.alpha} must lie in [0, 1].")
        for key in ("rank", "lowrank_iters", "svd_niter"):
            if getattr(self, key) < 0:
                raise DQError(f"option {key} must be a non-negative integer, got {getattr(self, key)}.")
        for key in ("num_grids", "max_tokens", "search_tokens", "search_top", "gptq_blocksize", "batch_size"):
            if getattr(self, key) < 1:
                raise DQError(f"option {key} must be a positive integer, got {getattr(self, key)}.")


@dataclass(frozen=True)
class SmoothQuantConfig(SVDQuantConfig):
    """SmoothQuant: SVDQuant's machinery with no low-rank branch and a fixed strength alpha = 0.5."""

    method: ClassVar[str] = "smoothquant"
    rank: int = 0
    smooth: Smoothing = Smoothing.FIXED
    alpha: float | None = 0.5


# -- planning ---------------------------------------------------------------------------------------
def _gelu_fc2_names(denoiser: nn.Module) -> set[str]:
    """Linears whose input is a (non-gated) GELU output: diffusers FeedForward `net.2` after a GELU `net.0`."""
    from diffusers.models.activations import GELU

    found = set()
    for name, module in denoiser.named_modules():
        net = getattr(module, "net", None)
        if isinstance(net, nn.ModuleList) and len(net) >= 3 and isinstance(net[0], GELU) and isinstance(net[2], nn.Linear):
            found.add(f"{name}.net.2" if name else "net.2")
    return found


def _branch_dtype(options: SVDQuantConfig, denoiser: nn.Module) -> str:
    if options.branch_dtype is not BranchDType.AUTO:
        return options.branch_dtype.value
    dtype = next((p.dtype for p in denoiser.parameters()), torch.float32)
    return "bfloat16" if dtype == torch.bfloat16 else "float16"


def plan_svdq_layers(denoiser: nn.Module, selection: LayerSelection, recipe: Recipe, options: SVDQuantConfig) -> None:
    """Plan Linear layers as svdq_linear (validating ranks before anything is swapped) and adaLN weight-only."""
    fc2 = _gelu_fc2_names(denoiser) if options.act_shift else set()
    branch_dtype = _branch_dtype(options, denoiser)
    for name, plan in list(selection.plans.items()):
        if plan.kind != "linear":
            continue
        module = denoiser.get_submodule(name)
        if options.rank > min(module.in_features, module.out_features):
            raise DQError(
                f"recipe {recipe.name!r}: rank {options.rank} exceeds layer {name!r} of size "
                f"[{module.out_features}, {module.in_features}] (at most {min(module.in_features, module.out_features)}); "
                "lower `rank` or skip the layer. The model was not changed."
            )
        act = plan.act
        shift = 0.0
        if name in fc2 and act is not None and act.fmt.is_integer:
            act = replace(act, format=f"uint{act.fmt.bits}")
            shift = GELU_SHIFT
        selection.plans[name] = LayerPlan("svdq_linear", plan.weight, act, {"rank": options.rank, "branch_dtype": branch_dtype, "act_shift": shift})
    if options.adaln_weight_only:
        for name, module in denoiser.named_modules():
            if type(module) is nn.Linear and name in selection.skipped and any(fnmatch(name, p) for p in ADALN_PATTERNS):
                if module.in_features % getattr(recipe.weight.granularity, "group_size", 1) == 0:
                    selection.plans[name] = LayerPlan("linear", recipe.weight, None)
                    del selection.skipped[name]


# -- calibrating one unit (a layer, or layers sharing their input) ---------------------------------------
def _fake_quant_rows(r: torch.Tensor, sizes: list[int], spec: QuantSpec) -> torch.Tensor:
    """Min-max fake quantization of each layer's rows of a stacked residual, as each layer's quantizer does."""
    if len(sizes) == 1:
        return fake_quantize(r, spec)
    return torch.cat([fake_quantize(part, spec) for part in torch.split(r, sizes, dim=0)], dim=0)


def _quantized_output(x: torch.Tensor, s: torch.Tensor, rq: torch.Tensor, lr: LowRank, act: QuantSpec | None, shift: float) -> torch.Tensor:
    xs = x / s
    xa = xs + shift if shift else xs
    xq = xa if act is None else fake_quantize(xa, act)
    y = xq @ rq.t()
    if shift:
        y = y - shift * rq.sum(1)
    if lr.rank:
        y = y + (xs @ lr.down.t()) @ lr.up.t()
    return y


@dataclass
class UnitResult:
    """What calibrating one unit chose and measured."""

    names: list[str]
    alpha: float
    beta: float
    error: float  # relative output MSE of the final layer(s) on the calibration tokens
    seconds: float
    errors: dict = field(default_factory=dict)


@contextmanager
def _intra_op_threads(n: int):
    """Temporarily set torch's intra-op threads (small GEMMs run faster on one thread, notably on a busy CPU)."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Below this many weight elements a unit's GEMMs are too small to gain from several threads.
SMALL_UNIT = 1 << 20


@torch.no_grad()
def calibrate_unit(
    layers: list[SVDQLinear],
    x: torch.Tensor,
    x_span: torch.Tensor,
    options: SVDQuantConfig,
    names: list[str] | None = None,
) -> UnitResult:
    """Smooth, decompose and set the residual of layers that read the same input `x` [N, in].

    Example:
        >>> layer = SVDQLinear.from_float(linear, w4, a4, rank=32)
        >>> calibrate_unit([layer], x_calib, x_calib.abs().amax(0), SVDQuantConfig())
    """
    small = sum(layer.in_features * layer.out_features for layer in layers) < SMALL_UNIT
    with _intra_op_threads(1 if small else torch.get_num_threads()):
        return _calibrate_unit(layers, x, x_span, options, names)


def _calibrate_unit(layers, x, x_span, options, names) -> UnitResult:
    t0 = time.perf_counter()
    weights = [layer.float_weight().detach() for layer in layers]
    sizes = [w.shape[0] for w in weights]
    w = torch.cat(weights, 0)
    x = x.float()
    y_ref = x @ w.t()
    ref_power = y_ref.pow(2).mean().clamp(min=1e-30)
    wspec = layers[0].weight_quantizer.spec
    act = layers[0].act_quantizer.spec
    shift = layers[0].act_shift
    rank = layers[0].rank

    def make_score(xt: torch.Tensor, yt: torch.Tensor, niter: int):
        power = yt.pow(2).mean().clamp(min=1e-30)

        def score(s: torch.Tensor) -> float:
            ws = w * s
            lr = low_rank(ws, rank, method=options.svd, niter=niter)
            rq = _fake_quant_rows(lr.residual(ws), sizes, wspec)
            y = _quantized_output(xt, s, rq, lr, act, shift)
            return float((y - yt).pow(2).mean() / power)

        return score

    w_span = w.abs().amax(0)
    guess = first_guess_alpha(wspec, act) if options.alpha is None else options.alpha
    if options.smooth is Smoothing.SEARCH:
        candidates = alpha_beta_grid(options.num_grids, options.search_beta, first=guess)
    else:
        candidates = [(guess, 1 - guess) if options.smooth is Smoothing.FIXED else (0.0, 0.0)]
    n_search = min(options.search_tokens, x.shape[0])
    if len(candidates) > 1 and n_search < x.shape[0]:
        # Whole grid on a token subsample (x is already a random subsample, so its head is one too) with
        # two power iterations; then the best few on every token with the full SVD settings.
        coarse = search_smoothing(x_span, w_span, candidates, make_score(x[:n_search], y_ref[:n_search], min(2, options.svd_niter)))
        top = sorted(coarse.errors, key=coarse.errors.get)[: max(1, options.search_top)]
        found = search_smoothing(x_span, w_span, top, make_score(x, y_ref, options.svd_niter))
        found.errors = coarse.errors  # every candidate scored on the same tokens
    else:
        found = search_smoothing(x_span, w_span, candidates, make_score(x, y_ref, options.svd_niter))
    # Install against the 16-bit smoothing vector the layer stores, so the residual matches it exactly.
    bd = layers[0].smooth.dtype
    finfo = torch.finfo(bd)
    s = found.scale.clamp(finfo.smallest_normal, finfo.max / 2).to(bd).float()
    ws = w * s
    lrs = shared_low_rank([wi * s for wi in weights], rank, options.svd, options.svd_niter) if len(layers) > 1 else [low_rank(ws, rank, options.svd, options.svd_niter)]
    if options.lowrank_iters and rank:
        if len(layers) > 1:
            logger.info("lowrank_iters is not applied to shared low-rank units (%s)", names)
        else:
            lrs = [refine_low_rank(ws, lrs[0], lambda r: fake_quantize(r, wspec), options.lowrank_iters, options.svd, options.svd_niter)]
    for layer, wi, lr in zip(layers, weights, lrs):
        layer.set_decomposition(s, lr.up, lr.down, wi)
    if options.gptq:
        xs = x / s + shift
        h = 2.0 / xs.shape[0] * (xs.double().t() @ xs.double())
        for layer in layers:
            _gptq_layer(layer, h.float(), options)
    y = torch.cat([layer(x) - (0 if layer.bias is None else layer.bias.float()) for layer in layers], dim=-1).float()
    err = float((y - y_ref).pow(2).mean() / ref_power)
    return UnitResult(names or [], found.alpha, found.beta, err, time.perf_counter() - t0, found.errors)


@torch.no_grad()
def _gptq_layer(layer: QuantLayerMixin, hessian: torch.Tensor, options: SVDQuantConfig) -> None:
    """GPTQ-round the layer's (residual) weight with its min-max scales fixed; rounding stays on its grid."""
    wq = layer.weight_quantizer
    if wq.progressive:
        raise DQError("GPTQ rounds on one grid of scales; progressive weights (two levels, QServe) round to nearest: drop gptq.")
    s, z = wq.expanded()
    z = torch.zeros_like(s) if z is None else z
    fmt = wq.spec.fmt

    def round_column(col: torch.Tensor, j: int) -> torch.Tensor:
        return (fmt.round(col / s[:, j] + z[:, j]) - z[:, j]) * s[:, j]

    w = layer._parameters["weight"]
    q = gptq_quantize(w.float(), hessian, round_column, blocksize=options.gptq_blocksize, percdamp=options.gptq_damp)
    w.data.copy_(q.to(w.dtype))
    if isinstance(layer, SVDQLinear):
        layer._invalidate()


# -- the calibrator ------------------------------------------------------------------------------------
def _units(names: list[str], inputs: dict[str, LayerInputs], shared: bool) -> list[list[str]]:
    if not shared:
        return [[n] for n in names]
    groups: dict[Any, list[str]] = {}
    for n in names:
        # Same tensor in every call, and siblings in one module (an address alone may be reused).
        key = (n.rpartition(".")[0], inputs[n].source) if inputs[n].source else n
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def calibrate_layers(
    denoiser: nn.Module, layers: dict[str, QuantLayerMixin], options: SVDQuantConfig, data: CalibData
) -> dict[str, UnitResult]:
    """Capture the inputs of every SVDQLinear in `layers` over the calibration data and calibrate them."""
    svdq = {n: layer for n, layer in layers.items() if isinstance(layer, SVDQLinear)}
    if not svdq:
        return {}
    inputs = capture_layer_inputs(denoiser, layers, data, list(svdq), max_tokens=options.max_tokens, batch_size=options.batch_size)
    results = {}
    for unit in tqdm(_units(list(svdq), inputs, options.shared_lowrank), desc="dq: svdquant", leave=False):
        first = inputs[unit[0]]
        if first.count == 0:
            raise DQError(f"layer {unit[0]!r} received no input while replaying the calibration samples; it cannot be calibrated.")
        for n in unit:
            layer = svdq[n]
            if layer.act_shift and float(inputs[n].minimum) < -layer.act_shift:
                # Not a post-GELU input after all: quantize it signed, unshifted.
                logger.warning("layer %s: input minimum %.3f is below -%.4f; no unsigned shift", n, float(inputs[n].minimum), layer.act_shift)
                layer.act_shift = 0.0
                spec = layer.act_quantizer.spec
                layer.act_quantizer.spec = replace(spec, format=f"int{spec.fmt.bits}")
        with torch.no_grad():
            result = calibrate_unit([svdq[n] for n in unit], first.tokens, first.absmax, options, names=unit)
        for n in unit:
            results[n] = result
        logger.debug("%s: alpha=%.2f beta=%.2f rel. MSE %.3g (%.2fs)", unit, result.alpha, result.beta, result.error, result.seconds)
    return results


@register_calibrator(SVDQuantConfig)
@register_calibrator(SmoothQuantConfig)
class SVDQuantCalibrator(Calibrator[SVDQuantConfig]):
    """SVDQuant (Li et al., 2024) and SmoothQuant: smoothing + low-rank branch + quantized residual per layer."""

    streams = (FLOAT,)  # smoothing, low rank and GPTQ's Hessian come from the float model's layer inputs

    def plan(self, denoiser: nn.Module, selection: LayerSelection, recipe: Recipe) -> None:
        plan_svdq_layers(denoiser, selection, recipe, self.config)

    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        calibrate_layers(denoiser, layers, self.config, data)

    def replay_groups(self, data: CalibData) -> list[list[CalibSample]]:
        return data.groups(self.config.batch_size)  # capture_layer_inputs' batches
