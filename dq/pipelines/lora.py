"""LoRA on dq-quantized denoisers: diffusers' `load_lora_weights` / `set_adapters` / `unload_lora_weights`.

diffusers hands LoRA loading to PEFT, whose default LoRA Linear wraps any nn.Linear subclass and adds
`lora_B(lora_A(x)) * scaling` to the base layer's output; deployed QuantLinear layers work under it as
they are (their `.weight` answers with the dequantized weight for PEFT's shape/dtype/device checks).
dq adds two things, per denoiser instance (`enable_lora`), without touching diffusers or PEFT classes:

- Validation before anything is injected: a LoRA whose modules are missing from the model or whose
  factor shapes do not fit raises a DQError naming the module, and the model stays unchanged.
- For SVDQLinear layers, the PEFT wrapper is given dq's forward (`SVDQLoraLinear`): the active adapters'
  factors are concatenated onto the SVDQ low-rank branch and run in the same quantized_linear call,
  nothing re-quantized. The branch sees x/s, so an adapter's down-projection enters as A diag(s)
  (A x = (A diag(s)) (x/s)) and its up-projection as B * scaling. While adapters train (gradients on
  their parameters) PEFT's own float side branch runs instead, which computes the same function.

Unloading removes PEFT's wrappers and leaves the quantized layers as they were: bit-identical output.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dq.errors import DQError
from dq.nn import SVDQLinear

logger = logging.getLogger(__name__)

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias")


def _peft_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


@functools.cache
def svdq_lora_linear_class() -> type:
    """PEFT's LoRA Linear with a forward that runs the adapters inside the SVDQ branch (built lazily: PEFT is optional)."""
    base_cls = _peft_linear_class()

    class SVDQLoraLinear(base_cls):
        """PEFT LoRA Linear around an SVDQLinear: adapters are concatenated onto the layer's low-rank branch."""

        def _fused_ok(self, kwargs: dict) -> bool:
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return False
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                if name in self.lora_variant or self.lora_bias.get(name, False):
                    return False
                dropout = self.lora_dropout[name]
                if self.training and not isinstance(dropout, nn.Identity):
                    return False
                if torch.is_grad_enabled() and (self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad):
                    return False
            return True

        def _branch(self, base: SVDQLinear) -> tuple[torch.Tensor, torch.Tensor]:
            parts = []
            for name in self.active_adapters:
                if name in self.lora_A and self.scaling[name] != 0:
                    a, b = self.lora_A[name].weight, self.lora_B[name].weight
                    parts.append((name, a, b, float(self.scaling[name])))
            key = tuple((n, id(a), a._version, id(b), b._version, s) for n, a, b, s in parts)
            key += ((id(base.lowrank_down), base.lowrank_down._version, id(base.smooth), base.smooth._version),)
            cache = self.__dict__.get("_dq_branch_cache")
            if cache is not None and cache[0] == key:
                return cache[1], cache[2]
            dtype, device = base.lowrank_down.dtype, base.lowrank_down.device
            s = base.smooth.float()
            downs = [base.lowrank_down] + [(a.detach().float().to(device) * s).to(dtype) for _, a, _, _ in parts]
            ups = [base.lowrank_up] + [(b.detach().float().to(device) * sc).to(dtype) for _, _, b, sc in parts]
            down, up = torch.cat(downs, 0).contiguous(), torch.cat(ups, 1).contiguous()
            # Keep the tensors the key names alive, so their ids cannot be reused by other tensors.
            self.__dict__["_dq_branch_cache"] = (key, down, up, [p[1:3] for p in parts])
            return down, up

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            base = self.get_base_layer()
            if args or not isinstance(base, SVDQLinear) or not self._fused_ok(kwargs):
                return super().forward(x, *args, **kwargs)
            down, up = self._branch(base)
            return base.forward_with_branch(x, down, up)

    SVDQLoraLinear.__qualname__ = "SVDQLoraLinear"
    return SVDQLoraLinear


def _fuse_svdq_wrappers(model: nn.Module) -> int:
    """Give PEFT's LoRA wrappers around SVDQLinear layers dq's fused forward; returns how many."""
    peft_linear, fused = _peft_linear_class(), svdq_lora_linear_class()
    n = 0
    for module in model.modules():
        if type(module) is peft_linear and isinstance(module.get_base_layer(), SVDQLinear):
            # A subclass that only overrides forward: the instance keeps all of PEFT's state and behaviour.
            module.__class__ = fused
            n += 1
    return n


def _read_state_dict(source: Any) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors when `source` is a dict or a local .safetensors file; None for other sources (hub ids, dirs)."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)) and str(source).endswith(".safetensors") and Path(source).is_file():
        from safetensors.torch import load_file

        return load_file(str(source))
    return None


def _peft_keys(state_dict: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """The state dict as diffusers will inject it: prefix stripped, converted to PEFT key names."""
    sd = state_dict
    if prefix is not None:
        sd = {k.removeprefix(f"{prefix}."): v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    if sd and "lora_A" not in next(iter(sd)):
        from diffusers.utils import convert_unet_state_dict_to_peft

        sd = convert_unet_state_dict_to_peft(sd)
    return sd


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple, tuple] | None:
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels // module.groups, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return None


def validate_lora(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None = None) -> list[str]:
    """Check a LoRA state dict against `model` before injection; returns the module names it targets.

    Raises DQError naming the module when a target is missing, is not a Linear/Conv2d, or when a factor
    shape does not match the layer (the model is not touched).

    Example:
        >>> validate_lora(pipe.unet, safetensors.torch.load_file("style.safetensors"), prefix="unet")
    """
    sd = _peft_keys(state_dict, prefix)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not suffix.endswith(".weight"):
            continue
        factors.setdefault(key[: -len(suffix)], {})[suffix.split(".")[1]] = value
    if not factors:
        return []
    problems = []
    for name, pair in sorted(factors.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r} does not exist in {type(model).__name__}")
            continue
        if hasattr(module, "get_base_layer"):  # already wrapped by PEFT for an earlier adapter
            module = module.get_base_layer()
        if "lora_A" not in pair or "lora_B" not in pair:
            problems.append(f"module {name!r} has only {sorted(pair)}; a LoRA needs both lora_A and lora_B")
            continue
        rank = pair["lora_A"].shape[0]
        expected = _expected_shapes(module, rank)
        if expected is None:
            problems.append(f"module {name!r} is a {type(module).__name__}; LoRA targets Linear or Conv2d layers")
            continue
        got = (tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape))
        if got != expected:
            problems.append(
                f"module {name!r}: lora_A {list(got[0])} / lora_B {list(got[1])} do not fit the layer "
                f"(expected {list(expected[0])} / {list(expected[1])})"
            )
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DQError(
            f"this LoRA does not match the model: {shown}. It was trained for another architecture or size; "
            "load a LoRA made for this base model. The model was not changed."
        )
    return sorted(factors)


def enable_lora(model: nn.Module) -> None:
    """Make diffusers' LoRA loading on `model` (and its pipeline's load_lora_weights) dq-aware. Idempotent.

    Wraps this instance's `load_lora_adapter` (the class is untouched): validate, let diffusers/PEFT
    inject, then fuse the adapters of SVDQ layers into their low-rank branch.

    Example:
        >>> dq.quantize(pipe, "svdquant-w4a4", calib=...)   # calls enable_lora(pipe.unet)
        >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")
        >>> pipe.set_adapters(["style"], [0.8]); pipe.unload_lora_weights()
    """
    original = getattr(model, "load_lora_adapter", None)
    if original is None or getattr(original, "_dq_wrapped", False):
        return

    @functools.wraps(original)
    def load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs):
        prefix = args[0] if args else kwargs.get("prefix", "transformer")
        state_dict = _read_state_dict(pretrained_model_name_or_path_or_dict)
        if state_dict is not None:
            targets = validate_lora(model, state_dict, prefix)
            if not targets and any(k.endswith(_LORA_SUFFIXES) for k in state_dict):
                logger.info("dq: no LoRA keys for prefix %r in this state dict", prefix)
            pretrained_model_name_or_path_or_dict = state_dict
        result = original(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        _fuse_svdq_wrappers(model)
        return result

    load_lora_adapter._dq_wrapped = True
    model.load_lora_adapter = load_lora_adapter
