"""Q-Diffusion: BRECQ block reconstruction with AdaRound, split shortcuts, then activation step learning.

Following q-diffusion's code (see the anchors):

1. Calibration data: the FP sampler's denoiser inputs at `calib_steps` uniformly spaced steps
   (CalibConfig(sampling="uniform"); cond and uncond rows both kept).
2. Split shortcut: in the UNet decoder a resnet's input is cat([h, skip]); its 1x1 `conv_shortcut`
   becomes a QuantSplitConv2d with separate activation and weight quantizers for the two halves
   (optionally `conv1` too, option split_conv1).
3. Weight scales: per-channel Lp (p=2.4) search of the clipping range.
4. Reconstruction, unit by unit in forward order: blocks (ResnetBlock2D, BasicTransformerBlock) and
   every quantized layer outside a block alone. Input: the quantized model's input to the unit;
   target: the FP model's output (BRECQ asym). AdaRound on the unit's weights, loss = block-output
   MSE + 0.01 * rounding regulariser (beta 20 -> 2, 20% warm-up). Activations stay in float here.
5. Activation scales: per-tensor Lp (p=2.4) search on calibration activations (per timestep group
   when `timestep_groups` > 1), then LSQ: the step sizes of each unit learned against the FP output
   with activations quantized (Adam, lr 4e-4 cosine-annealed to 0 over the iterations, as the
   reference code's block_reconstruction anneals it).

The paper runs 20k AdaRound and 5k LSQ iterations per unit on a GPU (23 GPU-hours for W4A8 LDM
Bedrooms); the defaults here (`iters`, `act_iters`) are small enough for CPU minutes on the
reference models and are recipe options. Attention matmul inputs (q, k, v, softmax) are not
quantized by dq's layers, so Q-Diffusion's attention-quantizer step has no counterpart.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from tqdm.auto import tqdm

from dq.calib.adaround import RECON_LAYER_KINDS, adaround, lp_loss, weight_quantizers_of
from dq.calib.base import Calibrator, CalibratorConfig, Sampling, register_calibrator
from dq.calib.capture import Captured, capture_io, forward_order, outputs_of
from dq.calib.data import FLOAT, WEIGHTS, CalibData
from dq.calib.observers import set_weight_scales
from dq.calib.state import quant_state
from dq.calib.timestep import calibrate_activations, check_observer, select_timestep, static_act_quantizers
from dq.errors import DQError
from dq.nn.base import QuantLayerMixin
from dq.nn.select import LayerSelection
from dq.nn.swap import LayerPlan

if TYPE_CHECKING:
    from dq.recipes import Recipe

logger = logging.getLogger(__name__)

# Module classes reconstructed as one unit (BRECQ blocks of the diffusers UNets and DiTs).
BLOCK_TYPES: tuple[type[nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock)


@dataclass(frozen=True)
class ReconConfig(CalibratorConfig):
    """Reconstruction settings shared by Q-Diffusion and TFMQ-DM (recipe `options`).

    Args:
        iters: AdaRound iterations per unit (paper: 20000).
        act_iters: LSQ iterations per unit (paper: 5000); 0 = observer scales only.
        lr: AdaRound alpha learning rate; BRECQ uses 1e-3 over 20k iterations, too slow to move alpha in 200.
        act_lr: LSQ step-size learning rate at the start (cosine-annealed to 0).
        reg, b_start, b_end, warmup: the rounding regulariser's weight and temperature decay.
        batch_size: calibration samples per reconstruction batch (x2 rows with CFG).
        recon_samples: calibration samples used for reconstruction (bounds memory).
        weight_observer, act_observer: initial range observers (Lp 2.4 in Q-Diffusion).
        timestep_groups: static activation scale sets over timestep intervals.
        split_shortcut, split_conv1: separate quantizers for the two halves of the decoder's cat([h, skip]).
        seed: seed of the batch orders (each unit draws its own, keyed by its name: `unit_rng`).
    """

    sampling: ClassVar[Sampling | None] = Sampling.UNIFORM
    iters: int = 200
    act_iters: int = 50
    lr: float = 1e-2
    act_lr: float = 4e-4
    reg: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 4
    recon_samples: int = 64
    weight_observer: str = "lp"
    act_observer: str = "lp"
    timestep_groups: int = 1
    split_shortcut: bool = True
    split_conv1: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_observer(self.weight_observer)
        check_observer(self.act_observer)
        if self.iters < 0 or self.act_iters < 0 or self.batch_size < 1 or self.recon_samples < 1 or self.timestep_groups < 1:
            raise DQError("iters/act_iters must be >= 0, batch_size/recon_samples/timestep_groups >= 1.")


@dataclass(frozen=True)
class QDiffusionConfig(ReconConfig):
    """Q-Diffusion: uniform timestep calibration, split shortcuts, BRECQ + AdaRound, Lp + LSQ activations."""

    method: ClassVar[str] = "qdiffusion"


# -- split shortcut -----------------------------------------------------------------------------------
def find_split_points(denoiser: nn.Module, conv1: bool = False) -> dict[str, int]:
    """name -> split channel of every UNet decoder resnet conv that reads cat([h, skip]).

    In diffusers' up blocks resnet i reads cat([h, skip]) where h has the previous resnet's output
    channels (i > 0) or the previous up block's (or the mid block's) output channels (i = 0).
    """
    points: dict[str, int] = {}
    up_blocks = getattr(denoiser, "up_blocks", None)
    mid = getattr(denoiser, "mid_block", None)
    if up_blocks is None:
        return points
    prev = mid.resnets[-1].out_channels if mid is not None and hasattr(mid, "resnets") else None
    for b, block in enumerate(up_blocks):
        resnets = getattr(block, "resnets", None)
        if resnets is None:
            continue
        for i, resnet in enumerate(resnets):
            h_channels = resnets[i - 1].out_channels if i > 0 else prev
            if h_channels is None or not 0 < h_channels < resnet.in_channels:
                continue
            targets = ["conv_shortcut"] + (["conv1"] if conv1 else [])
            for attr in targets:
                conv = getattr(resnet, attr, None)
                if isinstance(conv, nn.Conv2d) and conv.in_channels == resnet.in_channels:
                    points[f"up_blocks.{b}.resnets.{i}.{attr}"] = h_channels
        prev = resnets[-1].out_channels
    return points


def plan_split_shortcuts(denoiser: nn.Module, selection: LayerSelection, conv1: bool = False) -> list[str]:
    """Plan the quantized decoder convs that read cat([h, skip]) as split-input layers (`split_conv2d`).

    A planning decision, made on the whole denoiser before anything is swapped: a block quantized on its
    own (block-sequential calibration) no longer sees where its inputs were concatenated.
    """
    done = []
    for name, split in find_split_points(denoiser, conv1).items():
        plan = selection.plans.get(name)
        if plan is None or plan.kind != "conv2d":
            continue
        selection.plans[name] = LayerPlan("split_conv2d", plan.weight, plan.act, {**plan.options, "split": split})
        done.append(name)
    return done


# -- reconstruction -------------------------------------------------------------------------------------
def recon_units(denoiser: nn.Module, layers: dict[str, nn.Module], block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> dict[str, tuple[nn.Module, list[str]]]:
    """unit name -> (module, quantized layer names inside): blocks, then leftover layers alone."""
    units: dict[str, tuple[nn.Module, list[str]]] = {}
    covered: set[str] = set()
    for name, module in denoiser.named_modules():
        if isinstance(module, block_types) and not any(name.startswith(u + ".") for u in units):
            members = [n for n in layers if n.startswith(name + ".")]
            if members:
                units[name] = (module, members)
                covered.update(members)
    for name, layer in layers.items():
        if name not in covered:
            units[name] = (layer, [name])
    return units


def _check_layers(layers: dict[str, nn.Module], names: list[str]) -> None:
    for n in names:
        kind = getattr(layers[n], "kind", type(layers[n]).__name__)
        if kind not in RECON_LAYER_KINDS:
            raise DQError(
                f"layer {n!r} is a {kind!r} layer; reconstruction handles {', '.join(RECON_LAYER_KINDS)}. "
                "Skip it in the recipe or use a calibrator without reconstruction."
            )


def _unit_loss(module: nn.Module, batch: Captured, device: torch.device, grouped: bool) -> torch.Tensor:
    args, kwargs = batch.inputs(device)
    if grouped:
        select_timestep(module, batch.timesteps)
    outs = outputs_of(module(*args, **kwargs))
    return sum(lp_loss(o, t.to(device)) for o, t in zip(outs, batch.target))


def reconstruct_weights(
    denoiser: nn.Module, layers: dict[str, nn.Module], data: CalibData, opts: ReconConfig
) -> dict[str, float]:
    """AdaRound every reconstruction unit in forward order; returns unit -> (final loss / nearest loss)."""
    units = recon_units(denoiser, layers)
    order = forward_order(denoiser, {n: m for n, (m, _) in units.items()}, data)
    missing = sorted(set(units) - set(order))
    if missing:
        logger.warning("dq: %d reconstruction unit(s) never ran on the calibration data and keep nearest rounding: %s", len(missing), missing[:5])
    ratios = {}
    device = next(denoiser.parameters()).device
    for name in tqdm(order, desc="dq: AdaRound reconstruction", leave=False):
        module, members = units[name]
        if not members or opts.iters == 0:
            continue
        _check_layers(layers, members)
        batches = capture_io(denoiser, module, data, acts=False, max_samples=opts.recon_samples, batch_size=opts.batch_size)
        if not batches:
            continue
        ratios[name] = _adaround_unit(module, {n: layers[n] for n in members}, batches, opts, unit_rng(opts.seed, "adaround", name), device, grouped=False)
    return ratios


def unit_rng(seed: int, stage: str, unit: str) -> random.Random:
    """The batch order of one unit at one stage, keyed by the unit's name: the same whichever units are
    calibrated with it (the whole denoiser in memory, one block at a time, a recipe's `only`)."""
    return random.Random(f"{seed}/{stage}/{unit}")


def _adaround_unit(module: nn.Module, members: dict[str, nn.Module], batches: list[Captured], opts: ReconConfig, rng: random.Random, device: torch.device, grouped: bool) -> float:
    """AdaRound one unit's layers on its captured batches; returns the learned / nearest-rounding loss ratio."""
    return adaround(
        module, members,
        train_loss=lambda: _unit_loss(module, batches[rng.randrange(len(batches))], device, grouped),
        eval_loss=lambda: sum(_unit_loss(module, b, device, grouped) for b in batches),
        iters=opts.iters, lr=opts.lr, reg=opts.reg, warmup=opts.warmup, b_range=(opts.b_start, opts.b_end),
    )


def learn_act_scales(denoiser: nn.Module, layers: dict[str, nn.Module], data: CalibData, opts: ReconConfig) -> None:
    """LSQ: learn each unit's static activation step sizes against the FP output (acts quantized), Adam with
    the learning rate cosine-annealed to 0 (Q-Diffusion's block_reconstruction)."""
    if opts.act_iters == 0:
        return
    units = recon_units(denoiser, layers)
    order = forward_order(denoiser, {n: m for n, (m, _) in units.items()}, data)
    device = next(denoiser.parameters()).device
    grouped = opts.timestep_groups > 1
    for name in tqdm(order, desc="dq: activation step sizes (LSQ)", leave=False):
        module, members = units[name]
        quantizers = list(static_act_quantizers({n: layers[n] for n in members}).values())
        if not quantizers:
            continue
        batches = capture_io(denoiser, module, data, acts=True, max_samples=opts.recon_samples, batch_size=opts.batch_size, by_step=grouped)
        if not batches:
            continue
        params = [q.scale for q in quantizers]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=opts.act_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.act_iters, eta_min=0.0)
        rng = unit_rng(opts.seed, "lsq", name)
        try:
            with quant_state(module, weights=True, acts=True), torch.enable_grad():
                for _ in range(opts.act_iters):
                    loss = _unit_loss(module, batches[rng.randrange(len(batches))], device, grouped)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
                    with torch.no_grad():
                        for p in params:
                            p.clamp_(min=1e-8)
        finally:
            for p in params:
                p.requires_grad_(False)


class frozen_parameters:
    """Context: no float parameter of the model requires grad (only AdaRound alphas / step sizes train)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def init_weight_scales(layers: dict[str, nn.Module], observer: str) -> None:
    """Weight scales of every layer from an observer (Q-Diffusion: per-channel Lp 2.4 search)."""
    for layer in tqdm(list(layers.values()), desc=f"dq: weight scales ({observer})", leave=False):
        for wq, w2d in weight_quantizers_of(layer):
            set_weight_scales(wq, w2d.detach(), observer)


@register_calibrator(QDiffusionConfig)
class QDiffusionCalibrator(Calibrator[QDiffusionConfig]):
    """Q-Diffusion (Li et al., ICCV 2023): split shortcut + BRECQ/AdaRound + Lp/LSQ activation scales."""

    streams = (FLOAT, WEIGHTS)  # BRECQ: targets from the float model; weights reconstructed with activations in float

    def plan(self, denoiser: nn.Module, selection: LayerSelection, recipe: Recipe) -> None:
        if self.config.split_shortcut:
            split = plan_split_shortcuts(denoiser, selection, conv1=self.config.split_conv1)
            logger.info("dq: split-shortcut quantizers on %d decoder convs", len(split))

    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        opts = self.config
        _check_layers(layers, list(layers))
        init_weight_scales(layers, opts.weight_observer)
        with frozen_parameters(denoiser):
            ratios = reconstruct_weights(denoiser, layers, data, opts)
            if ratios:
                logger.info("dq: AdaRound block loss / nearest-rounding loss: median %.3f over %d units",
                            sorted(ratios.values())[len(ratios) // 2], len(ratios))
            calibrate_activations(denoiser, layers, data, opts.act_observer, opts.timestep_groups, opts.batch_size)
            learn_act_scales(denoiser, layers, data, opts)
