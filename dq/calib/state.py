"""Switch the quantizers of a model between float and quantized computation during calibration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from dq.nn.quantizer import ActQuantizer, WeightQuantizer


@contextmanager
def quant_state(module: nn.Module, weights: bool = True, acts: bool = True) -> Iterator[None]:
    """Within the block, weights / activations under `module` are quantized only when asked.

    weights=False, acts=False runs the float model (simulate-mode layers share the float weights).

    Example:
        >>> with quant_state(unet, weights=False, acts=False):
        ...     fp_out = unet(x, t, encoder_hidden_states=c).sample
    """
    saved = []
    for m in module.modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            saved.append((m, m.bypass))
            m.bypass = not (weights if isinstance(m, WeightQuantizer) else acts)
    try:
        yield
    finally:
        for m, bypass in saved:
            m.bypass = bypass
