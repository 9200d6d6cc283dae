"""Timestep-aware activation scales: one static parameter set per timestep group, chosen per call.

Diffusion activations drift with the timestep (TFMQ-DM, ViDiT-Q, CacheQuant all keep per-step or
per-range scales). Here a static ActQuantizer holds `groups` (scale, zero) sets and the calibrated
timestep interval of each (`timestep_ranges`, saved with the checkpoint). A forward pre-hook on the
denoiser reads its `timestep` argument and selects, for every such quantizer, the group whose interval
contains t, or the nearest one for timesteps never seen in calibration (another scheduler or step
count). groups=1 is an ordinary static quantizer; groups=number of steps is TFMQ's finite set
calibration. Dynamic per-token activations (ViDiT-Q) stay the alternative: they need no groups.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from dq.calib.base import Calibrator, CalibratorConfig, Sampling, register_calibrator
from dq.calib.data import WEIGHTS, CalibData, CalibSample, stream_of
from dq.calib.observers import OBSERVERS
from dq.calib.state import quant_state
from dq.errors import DQError
from dq.nn.base import QuantLayerMixin
from dq.nn.quantizer import ActQuantizer

if TYPE_CHECKING:
    from dq.recipes import Recipe

logger = logging.getLogger(__name__)

HOOK_ATTR = "_dq_timestep_hook"
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_positions: dict[type, int | None] = {}


def _timestep_position(module: nn.Module) -> int | None:
    """Positional index of the forward's timestep parameter (counting after self), cached per class."""
    cls = type(module)
    if cls not in _positions:
        _positions[cls] = None
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        for i, p in enumerate(params):
            if p.name in _TIMESTEP_NAMES and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                _positions[cls] = i
                break
    return _positions[cls]


def timesteps_of(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep argument of a denoiser call as a 1-D float tensor (kwargs or positional)."""
    value = next((kwargs[n] for n in _TIMESTEP_NAMES if n in kwargs), None)
    if value is None:
        pos = _timestep_position(module)
        if pos is not None and pos < len(args):
            value = args[pos]
    if value is None:
        raise DQError(
            f"{type(module).__name__} was called without a `timestep` argument; timestep-aware scales need "
            "the denoiser's timestep (pass it as `timestep=`)."
        )
    return torch.as_tensor(value).detach().float().reshape(-1).cpu()


def timestep_of(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """The (first) timestep value of a denoiser call."""
    return float(timesteps_of(module, args, kwargs)[0])


def nearest_group(ranges: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Group index per timestep: the interval [lo, hi] containing t, else the nearest interval."""
    lo, hi = ranges[:, 0].float().cpu(), ranges[:, 1].float().cpu()
    t = t.reshape(-1, 1)
    dist = (lo - t).clamp(min=0) + (t - hi).clamp(min=0)
    return dist.argmin(dim=1)


def group_ranges(timesteps: list[float], groups: int) -> torch.Tensor:
    """Split the distinct calibrated timesteps (sorted) into `groups` contiguous intervals [G, 2]."""
    ts = sorted(set(float(t) for t in timesteps))
    if not ts:
        raise DQError("no calibrated timesteps to group.")
    n = min(groups, len(ts))
    bounds = torch.linspace(0, len(ts), n + 1).round().long().tolist()  # array_split: no empty group
    return torch.tensor([[ts[a], ts[b - 1]] for a, b in zip(bounds[:-1], bounds[1:])])


def grouped_quantizers(root: nn.Module) -> list[ActQuantizer]:
    return [m for m in root.modules() if isinstance(m, ActQuantizer) and m.groups > 1]


def select_timestep(root: nn.Module, t: torch.Tensor | float, quantizers: list[ActQuantizer] | None = None) -> None:
    """Select every grouped quantizer's parameter set for timestep(s) t (one per batch row, or shared)."""
    t = torch.as_tensor(t).float().reshape(-1).cpu()
    for q in grouped_quantizers(root) if quantizers is None else quantizers:
        g = nearest_group(q.timestep_ranges, t)
        if bool((g == g[0]).all()):
            q.group = int(g[0])
        else:
            q.group = g.to(q.scale.device)


def attach_timestep_hook(denoiser: nn.Module, quantizers: list[ActQuantizer] | None = None) -> bool:
    """Install (or refresh) the pre-forward hook that selects timestep groups. False when none are grouped.

    quantizers: the grouped quantizers it selects for (default: every one under the denoiser).

    Example:
        >>> attach_timestep_hook(pipe.unet)   # done by dq.quantize and by from_pretrained
    """
    old = getattr(denoiser, HOOK_ATTR, None)
    if old is not None:
        old.remove()
        object.__setattr__(denoiser, HOOK_ATTR, None)
    quantizers = grouped_quantizers(denoiser) if quantizers is None else quantizers
    if not quantizers:
        return False

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        select_timestep(module, timesteps_of(module, args, kwargs), quantizers)

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(denoiser, HOOK_ATTR, handle)
    return True


# -- calibration of grouped static activation scales ------------------------------------------------
def static_act_quantizers(layers: dict[str, nn.Module]) -> dict[str, ActQuantizer]:
    """name -> static ActQuantizer of every layer (split layers contribute two, suffixed ':skip')."""
    found = {}
    for name, layer in layers.items():
        for suffix, attr in (("", "act_quantizer"), (":skip", "act_quantizer_skip")):
            q = getattr(layer, attr, None)
            if isinstance(q, ActQuantizer) and q.static:
                found[name + suffix] = q
    return found


def calibrate_activations(
    denoiser: nn.Module,
    layers: dict[str, nn.Module],
    data: CalibData,
    observer: str = "minmax",
    groups: int = 1,
    batch_size: int = 8,
    observer_options: dict | None = None,
    weights_quantized: bool = True,
) -> int:
    """Set the static activation scales of `layers` from calibration data, one set per timestep group.

    Each group replays its samples (one step per batch) with activations in float, feeding what each
    activation quantizer would see to a fresh observer. Returns the number of groups used.

    Args:
        observer: a name in dq.calib.observers.OBSERVERS (minmax, percentile, mse, lp).
        groups: timestep groups (1 = one static scale; the number of calibrated steps = TFMQ's FSC).
        weights_quantized: replay with quantized weights (True) or float weights.
    """
    quantizers = static_act_quantizers(layers)
    if not quantizers:
        return 1
    timesteps = [s.timestep for s in data.samples]
    ranges = group_ranges(timesteps, groups) if groups > 1 else None
    n_groups = 1 if ranges is None else ranges.shape[0]
    if groups > 1 and n_groups < groups:
        logger.warning("dq: %d timestep groups asked but calibration saw %d distinct timesteps; using %d", groups, n_groups, n_groups)
    if n_groups == 1:
        ranges = None  # one group is a plain static quantizer
    device = next(denoiser.parameters()).device
    for q in quantizers.values():
        q.set_groups(n_groups, device=device)
        if ranges is not None:
            q.timestep_ranges = ranges.to(device).clone()  # one tensor per quantizer: safetensors refuses shared storage
    names = {id(q): n for n, q in quantizers.items()}
    obs_cls = OBSERVERS.get(observer)
    current = {"step": -1}
    found: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {id(q): {} for q in quantizers.values()}
    for g in tqdm(range(n_groups), desc="dq: activation scales", leave=False):
        members = data.samples if ranges is None else [
            s for s in data.samples if int(nearest_group(ranges, torch.tensor([s.timestep]))[0]) == g
        ]
        observers = {id(q): obs_cls(q.spec, **(observer_options or {})) for q in quantizers.values()}

        def hook(module: ActQuantizer, args: tuple) -> None:
            x = args[0].detach()
            if not bool(torch.isfinite(x).all()):
                raise DQError(
                    f"non-finite activation at the input of layer {names[id(module)]!r} at step {current['step']}; "
                    "the model overflows in this dtype (run calibration in float32) or the calibration data is broken."
                )
            observers[id(module)].update(x)

        handles = [q.register_forward_pre_hook(hook) for q in quantizers.values()]
        try:
            with quant_state(denoiser, weights=weights_quantized, acts=False), torch.no_grad():
                sub = data.subset(members)
                for batch in sub.batches(batch_size, by_step=True):
                    current["step"] = batch.samples[0].step
                    sub.replay(denoiser, batch, stream_of(weights_quantized, False))
        finally:
            for h in handles:
                h.remove()
        for q in quantizers.values():
            if not observers[id(q)].empty:
                found[id(q)][g] = observers[id(q)].compute()
    for q in quantizers.values():
        seen = found[id(q)]
        if not seen:
            raise DQError(
                f"layer {names[id(q)]!r} received no input while replaying the calibration data, so its activation "
                "scale cannot be set; skip the layer in the recipe."
            )
        for g in range(n_groups):
            # A layer a step cache skips on some steps has no statistics in groups of only those steps (it does
            # not run there); such a group takes the scale of the nearest group in timestep order.
            scale, zero = seen[g] if g in seen else seen[min(seen, key=lambda k: (abs(k - g), k))]
            if ranges is None:
                q.scale = scale.reshape(q.scale.shape).to(device)
                if q.zero is not None:
                    q.zero = zero.reshape(q.zero.shape).to(device)
            else:
                q.scale[g] = scale.reshape(1, 1).to(device)
                if q.zero is not None:
                    q.zero[g] = zero.reshape(1, 1).to(device)
    attach_timestep_hook(denoiser)
    return n_groups


# -- the cheap calibrator: round-to-nearest weights, timestep-grouped min-max activations --------------
def check_observer(name: str) -> None:
    """DQError listing the registered observers when `name` is not one."""
    OBSERVERS.get(name)


@dataclass(frozen=True)
class TimestepConfig(CalibratorConfig):
    """Min-max weight scales (set at swap) and static activation scales per timestep group.

    Args:
        timestep_groups: contiguous timestep intervals, one activation scale set each.
        act_observer: the observer of activation ranges (dq.calib.observers.OBSERVERS).
        batch_size: calibration samples per replayed denoiser call.
    """

    method: ClassVar[str] = "timestep"
    sampling: ClassVar[Sampling | None] = Sampling.UNIFORM
    timestep_groups: int = 4
    act_observer: str = "minmax"
    batch_size: int = 8

    def validate(self) -> None:
        check_observer(self.act_observer)
        if self.timestep_groups < 1 or self.batch_size < 1:
            raise DQError("timestep_groups and batch_size must be >= 1.")


@register_calibrator(TimestepConfig)
class TimestepCalibrator(Calibrator[TimestepConfig]):
    """Min-max (or another observer's) static activation scales, one set per timestep group."""

    streams = (WEIGHTS,)  # ranges observed with the weights quantized and the activations in float

    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        c = self.config
        calibrate_activations(denoiser, layers, data, c.act_observer, c.timestep_groups, c.batch_size, weights_quantized=True)

    def replay_groups(self, data: CalibData) -> list[list[CalibSample]]:
        return data.groups(self.config.batch_size, by_step=True)  # calibrate_activations' batches
