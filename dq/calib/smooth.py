"""Smoothing (SmoothQuant, as SVDQuant uses it): migrate activation outliers into the weights.

Per input channel j, s_j = max|X_j|^alpha / max|W_:,j|^beta; the layer then computes (X / s)(W diag(s))^T,
which is exactly X W^T in floating point but moves the channel's range from X (hard: outliers per
channel, quantized per token) into W (easy: its columns are absorbed by the low-rank branch or
quantized per group). alpha is searched per layer on a grid, each candidate scored by the error of the
layer's output with the low-rank branch and both quantizers in the loop (deepcompressor's
SmoothCalibrator), starting from a closed-form guess.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dq.calib.data import FLOAT, CalibData
from dq.calib.state import quant_state
from dq.errors import DQError
from dq.quant import QuantSpec


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over every token, per channel (last dimension), float32."""
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def smooth_scale(x_span: torch.Tensor, w_span: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = x_span^alpha / w_span^beta per channel (alpha = beta = 0: no smoothing); zero spans give s = 1.

    Args:
        x_span: [in] per-channel max |X| over calibration tokens.
        w_span: [in] per-input-channel max |W| over the output rows (of every layer sharing the input).
        alpha, beta: migration strengths in [0, 1]; SmoothQuant's balanced choice is alpha = beta = 0.5.

    Example:
        >>> s = smooth_scale(channel_absmax(x), w.abs().amax(0), 0.5, 0.5)
        >>> torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4)
    """
    if not (0 <= alpha <= 1 and 0 <= beta <= 1):
        raise DQError(f"smoothing strengths must lie in [0, 1]; got alpha={alpha}, beta={beta}.")
    x_span, w_span = x_span.float(), w_span.float()
    if alpha == 0 and beta == 0:
        return torch.ones_like(w_span)
    scale = x_span.pow(alpha) if alpha > 0 else torch.ones_like(x_span)
    if beta > 0:
        scale = scale / w_span.pow(beta)
    # Dead channels (zero span on either side) keep s = 1 rather than 0 or inf.
    bad = ~torch.isfinite(scale) | (scale <= 0) | (x_span <= 0) | (w_span <= 0)
    return torch.where(bad, torch.ones_like(scale), scale)


def first_guess_alpha(weight_spec: QuantSpec, act_spec: QuantSpec | None) -> float:
    """Closed-form migration strength: alpha = b_w / (b_w + b_x).

    Each bit of a quantizer halves its step, so splitting the log-range between X and W in proportion
    to their bit widths equalizes the two rounding errors: 0.5 for W4A4 (SmoothQuant's default), about
    1/3 for W4A8 (8-bit activations keep more of the outlier range), 0 (no smoothing) for weight-only.
    """
    if act_spec is None:
        return 0.0
    bw, bx = weight_spec.fmt.bits, act_spec.fmt.bits
    return bw / (bw + bx)


def alpha_beta_grid(num_grids: int, search_beta: bool = False, first: float | None = None) -> list[tuple[float, float]]:
    """Candidate (alpha, beta) pairs: (0, 0), then alpha = k / num_grids with beta = 1 - alpha.

    With `search_beta`, beta = 0 variants (x^alpha alone) are added, deepcompressor's ~39-candidate
    population. `first` (the closed-form guess) is scored first, so a tie keeps it.
    """
    if num_grids < 1:
        raise DQError(f"smoothing grid needs num_grids >= 1, got {num_grids}.")
    pairs: list[tuple[float, float]] = []
    if first is not None:
        pairs.append((round(first, 6), round(1 - first, 6)))
    pairs.append((0.0, 0.0))
    for k in range(1, num_grids):
        a = k / num_grids
        pairs.append((a, round(1 - a, 6)))
        if search_beta:
            pairs.append((a, 0.0))
    seen, unique = set(), []
    for p in pairs:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


@dataclass
class SmoothSearch:
    """The outcome of a smoothing search: the chosen scale and (alpha, beta), and every candidate's error."""

    scale: torch.Tensor
    alpha: float
    beta: float
    errors: dict[tuple[float, float], float]


def search_smoothing(
    x_span: torch.Tensor,
    w_span: torch.Tensor,
    candidates: list[tuple[float, float]],
    score: Callable[[torch.Tensor], float],
) -> SmoothSearch:
    """Score every (alpha, beta) candidate's scale with `score` (lower is better) and keep the best.

    Args:
        x_span, w_span: per-channel spans (see smooth_scale).
        candidates: (alpha, beta) pairs, e.g. from alpha_beta_grid.
        score: maps a smoothing scale [in] to the layer-output error with quantization in the loop.
    """
    best: SmoothSearch | None = None
    errors = {}
    for alpha, beta in candidates:
        s = smooth_scale(x_span, w_span, alpha, beta)
        err = float(score(s))
        if not math.isfinite(err):
            continue
        errors[(alpha, beta)] = err
        if best is None or err < errors[(best.alpha, best.beta)]:
            best = SmoothSearch(s, alpha, beta, errors)
    if best is None:
        raise DQError("every smoothing candidate gave a non-finite error; the calibration inputs contain inf/nan.")
    best.errors = errors
    return best


# -- activation statistics ----------------------------------------------------------------------------
@dataclass
class LayerInputs:
    """What one layer saw during calibration: a token subsample, per-channel max |x|, the minimum, and
    `source`, a key equal for layers that always read the same input tensor (q, k, v)."""

    tokens: torch.Tensor
    absmax: torch.Tensor
    minimum: torch.Tensor
    count: int
    source: Any = None


def layer_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one layer's token subsample, keyed by its name: the same tokens whichever layers are
    captured with it (the whole denoiser in memory, or one block at a time in dq.pipelines.sequential)."""
    return torch.Generator().manual_seed(random.Random(f"{seed}/{name}").getrandbits(63))


@torch.no_grad()
def capture_layer_inputs(
    denoiser: nn.Module,
    quant_layers: dict[str, nn.Module],
    data: CalibData,
    names: list[str],
    max_tokens: int = 2048,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, LayerInputs]:
    """Replay denoiser calls with every quantizer bypassed and record the inputs of the layers `names`.

    Args:
        denoiser: the model whose layers were swapped (simulate mode).
        quant_layers: every swapped layer (all run unquantized, so the statistics are the FP model's).
        data: the calibration samples, replayed `batch_size` per denoiser call.
        names: layers whose inputs are recorded.
        max_tokens: tokens kept per layer (a uniform random subsample); channel maxima use every token.
        seed: with each layer's name, keys the generator of its subsample (layer_generator).
    """
    batches = list(data.batches(batch_size))
    per_call = max(32, -(-max_tokens // max(1, len(batches))))
    gens = {n: layer_generator(seed, n) for n in names}
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    stats: dict[str, list] = {n: [None, None, 0, []] for n in names}  # absmax, min, count, source keys
    call = [0]

    def record(name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        st = stats[name]
        amax, amin = x2.abs().amax(0), x2.amin()
        st[0] = amax if st[0] is None else torch.maximum(st[0], amax)
        st[1] = amin if st[1] is None else torch.minimum(st[1], amin)
        st[2] += x2.shape[0]
        st[3].append((call[0], x.data_ptr(), tuple(x.shape)))
        idx = torch.randperm(x2.shape[0], generator=gens[name])[:per_call]
        parts[name].append(x2[idx.to(x2.device)].cpu())

    def hook(name: str):
        return lambda module, args: record(name, args[0])

    handles = [quant_layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        # Every swapped layer runs on its float weight and input, so the statistics are the FP model's.
        with quant_state(denoiser, weights=False, acts=False):
            for batch in tqdm(batches, desc="dq: capturing layer inputs", leave=False):
                data.replay(denoiser, batch, FLOAT)
                call[0] += 1
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        amax, amin, count, keys = stats[n]
        if count == 0:
            out[n] = LayerInputs(torch.zeros(0), torch.zeros(0), torch.zeros(()), 0)
            continue
        tokens = torch.cat(parts[n], 0)
        if tokens.shape[0] > max_tokens:
            tokens = tokens[torch.randperm(tokens.shape[0], generator=gens[n])[:max_tokens]]
        out[n] = LayerInputs(tokens, amax.cpu(), amin.cpu(), count, tuple(keys))
    return out
