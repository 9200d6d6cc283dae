"""Replay calibration samples through the denoiser and capture one module's inputs and outputs.

Capture stops the denoiser's forward right after the module (an exception from the hook), so each
replay costs only the layers up to it, and keeps at most `max_samples` calibration samples on CPU:
memory is bounded by one module's activations, never the whole model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dq.calib.data import FLOAT, QUANTIZED, CalibBatch, CalibData, map_tensors, stream_of
from dq.calib.state import quant_state
from dq.sizes import nested_tensors


class _Stop(Exception):
    """Raised by a capture hook to end the denoiser's forward early."""


@dataclass
class Captured:
    """One replay batch at a module: its inputs, the FP target outputs, and the rows' timesteps."""

    args: tuple
    kwargs: dict
    target: list[torch.Tensor]
    timesteps: torch.Tensor

    def inputs(self, device: torch.device) -> tuple[tuple, dict]:
        return map_tensors(self.args, lambda t: t.to(device)), map_tensors(self.kwargs, lambda t: t.to(device))


def _cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().cpu())


def outputs_of(out: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, a tuple, or a diffusers output object)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for _, t in nested_tensors(out) if t.is_floating_point()]


def _replay_until_stop(denoiser: nn.Module, data: CalibData, batch: CalibBatch, stream: str = QUANTIZED) -> None:
    try:
        data.replay(denoiser, batch, stream)
    except _Stop:
        pass


def forward_order(denoiser: nn.Module, modules: dict[str, nn.Module], data: CalibData) -> list[str]:
    """Names of `modules` in the order the denoiser first calls them (those never called are left out)."""
    order: list[str] = []
    handles = []
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: order.append(n) if n not in order else None))
    try:
        with quant_state(denoiser, weights=False, acts=False), torch.no_grad():
            data.replay(denoiser, next(data.batches(1)))
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def capture_io(
    denoiser: nn.Module,
    module: nn.Module,
    data: CalibData,
    *,
    acts: bool,
    max_samples: int,
    batch_size: int,
    by_step: bool = False,
) -> list[Captured]:
    """Inputs of `module` in the quantized model (weights quantized; activations when `acts`) and its
    outputs in the FP model, for up to `max_samples` calibration samples (BRECQ's asymmetric targets). Each
    replay takes the samples' inputs in its own quantization state where they carry them (block-sequential
    calibration: the float model's for the targets, the weight-quantized model's for inputs without `acts`).
    """
    found: dict[str, Any] = {}

    def grab_input(mod, args, kwargs):
        found["in"] = (_cpu(args), _cpu(kwargs))
        raise _Stop

    def grab_output(mod, args, kwargs, out):
        found["out"] = [t.detach().cpu() for t in outputs_of(out)]
        raise _Stop

    result = []
    for batch in data.batches(batch_size, by_step=by_step, max_samples=max_samples):
        found.clear()
        h = module.register_forward_pre_hook(grab_input, with_kwargs=True)
        try:
            with quant_state(denoiser, weights=True, acts=acts):
                _replay_until_stop(denoiser, data, batch, stream_of(True, acts))
        finally:
            h.remove()
        h = module.register_forward_hook(grab_output, with_kwargs=True)
        try:
            with quant_state(denoiser, weights=False, acts=False):
                _replay_until_stop(denoiser, data, batch, FLOAT)
        finally:
            h.remove()
        if "in" not in found or "out" not in found:
            continue
        result.append(Captured(found["in"][0], found["in"][1], found["out"], batch.timesteps))
    return result
