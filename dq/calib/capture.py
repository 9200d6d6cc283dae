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

from dq.calib.collect import CalibData, _map, _tensors, to_device
from dq.calib.state import quant_state


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
        return _map(self.args, lambda t: t.to(device)), _map(self.kwargs, lambda t: t.to(device))


def _cpu(obj: Any) -> Any:
    return _map(obj, lambda t: t.detach().cpu())


def outputs_of(out: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, a tuple, or a diffusers output object)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for _, t in _tensors(out) if t.is_floating_point()]


def _replay(denoiser: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        denoiser(*args, **kwargs)
    except _Stop:
        pass


def forward_order(denoiser: nn.Module, modules: dict[str, nn.Module], data: CalibData) -> list[str]:
    """Names of `modules` in the order the denoiser first calls them (those never called are left out)."""
    order: list[str] = []
    handles = []
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: order.append(n) if n not in order else None))
    device, dtype = _device_dtype(denoiser)
    try:
        with quant_state(denoiser, weights=False, acts=False), torch.no_grad():
            _, args, kwargs = next(data.batches(1))
            denoiser(*to_device(args, device, dtype), **to_device(kwargs, device, dtype))
    finally:
        for h in handles:
            h.remove()
    return order


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


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
    outputs in the FP model, for up to `max_samples` calibration samples (BRECQ's asymmetric targets).
    """
    device, dtype = _device_dtype(denoiser)
    found: dict[str, Any] = {}

    def grab_input(mod, args, kwargs):
        found["in"] = (_cpu(args), _cpu(kwargs))
        raise _Stop

    def grab_output(mod, args, kwargs, out):
        found["out"] = [t.detach().cpu() for t in outputs_of(out)]
        raise _Stop

    result = []
    for chunk, args, kwargs in data.batches(batch_size, by_step=by_step, max_samples=max_samples):
        args, kwargs = to_device(args, device, dtype), to_device(kwargs, device, dtype)
        found.clear()
        h = module.register_forward_pre_hook(grab_input, with_kwargs=True)
        try:
            with quant_state(denoiser, weights=True, acts=acts):
                _replay(denoiser, args, kwargs)
        finally:
            h.remove()
        h = module.register_forward_hook(grab_output, with_kwargs=True)
        try:
            with quant_state(denoiser, weights=False, acts=False):
                _replay(denoiser, args, kwargs)
        finally:
            h.remove()
        if "in" not in found or "out" not in found:
            continue
        ts = torch.cat([torch.full((s.rows,), s.timestep) for s in chunk])
        result.append(Captured(found["in"][0], found["in"][1], found["out"], ts))
    return result


@torch.no_grad()
def capture_layers(
    denoiser: nn.Module,
    data: CalibData,
    names: list[str],
    *,
    max_rows: int = 4096,
    batch_size: int = 8,
    outputs: bool = True,
    quantized: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Inputs (and outputs) of the named layers over the calibration data, flattened to [rows, features].

    Each layer keeps at most `max_rows` rows (a random subsample of the pool once full), so
    memory is bounded by len(names) * max_rows * features, whatever the data size. The model runs in
    float unless `quantized`.

    Example:
        >>> io = capture_layers(pipe.unet, data, ["mid_block.attentions.0.proj_in"], max_rows=2048)
        >>> x, y = io["mid_block.attentions.0.proj_in"]
    """
    device, dtype = _device_dtype(denoiser)
    store: dict[str, list[list[torch.Tensor]]] = {n: [[], []] for n in names}
    gen = torch.Generator().manual_seed(0)

    def rows_of(t: torch.Tensor, conv: bool) -> torch.Tensor:
        t = t.detach().float()
        t = t.movedim(1, -1) if conv and t.dim() == 4 else t
        return t.reshape(-1, t.shape[-1]).cpu()

    def make_hook(name: str, conv: bool):
        def hook(mod, args, out):
            xs, ys = store[name]
            xs.append(rows_of(args[0], conv))
            if outputs:
                ys.append(rows_of(out, conv))
            if sum(x.shape[0] for x in xs) > max_rows:  # over the cap: keep a random max_rows of the pool
                keep = torch.randperm(sum(x.shape[0] for x in xs), generator=gen)[:max_rows]
                store[name][0] = [torch.cat(xs)[keep]]
                if outputs:
                    store[name][1] = [torch.cat(ys)[keep]]
        return hook

    handles = []
    for name in names:
        module = denoiser.get_submodule(name)
        handles.append(module.register_forward_hook(make_hook(name, isinstance(module, nn.Conv2d))))
    try:
        with quant_state(denoiser, weights=quantized, acts=quantized):
            for _, args, kwargs in data.batches(batch_size):
                denoiser(*to_device(args, device, dtype), **to_device(kwargs, device, dtype))
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, (xs, ys) in store.items():
        x = torch.cat(xs)[:max_rows] if xs else torch.empty(0)
        y = torch.cat(ys)[:max_rows] if ys else None
        result[name] = (x, y)
    return result
