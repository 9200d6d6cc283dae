"""PEFT's LoRA layers around dq's quantized layers: the forward, fuse and unfuse each layer kind allows.

diffusers injects PEFT's `lora.Linear` / `lora.Conv2d` wrappers; dq then gives each wrapper around a dq layer
a subclass of its own class (`adopt_lora_wrappers`), so the instance keeps all of PEFT's state and behaviour:

- around an SVDQLinear (`SVDQLoraLinear`): the active adapters' factors are concatenated onto the layer's
  16-bit low-rank branch and run in the same quantized_linear call. The branch sees x/s, so an adapter's
  down-projection enters as A diag(s) (A x = (A diag(s)) (x/s)) and its up-projection as B * scaling.
  `fuse_lora` appends them to the branch for good, exactly (the rank grows by the adapter's rank) and
  `unfuse_lora` removes them again, bit for bit. DoRA, LoRA biases, dropout in training and adapters whose
  parameters train run PEFT's own float side branch, which computes the same function.
- around any other quantized layer (`QuantLoraLinear`, `QuantLoraConv2d`): PEFT's float side branch.
  Fusing is refused: the sum would have to be re-quantized, which changes the layer beyond the LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Conv2d as PeftLoraConv2d
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from dq.errors import DQError
from dq.nn import SVDQLinear
from dq.nn.base import QuantLayerMixin


def fuse_refusal(names: list[str]) -> DQError:
    """The error for fusing adapters into quantized layers that cannot take them exactly."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return DQError(
        f"fuse_lora cannot fold adapters into the quantized layers {shown}: their weights are packed integer codes, "
        "and adding the LoRA would mean re-quantizing them (only SVDQuant layers take an adapter exactly, in their "
        "16-bit low-rank branch). Keep the LoRA unfused: it runs as a 16-bit side branch with the same output. "
        "Nothing was fused."
    )


class QuantLoraLinear(PeftLoraLinear):
    """PEFT LoRA Linear around a QuantLinear: PEFT's side branch; fusing is refused."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if any(n in self.lora_A for n in check_adapters_to_merge(self, adapter_names)):
            raise fuse_refusal([type(self.get_base_layer()).__name__])


class QuantLoraConv2d(PeftLoraConv2d):
    """PEFT LoRA Conv2d around a QuantConv2d (or a split-input conv): PEFT's side branch; fusing is refused."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if any(n in self.lora_A for n in check_adapters_to_merge(self, adapter_names)):
            raise fuse_refusal([type(self.get_base_layer()).__name__])


class SVDQLoraLinear(PeftLoraLinear):
    """PEFT LoRA Linear around an SVDQLinear: adapters run in, and fuse into, the layer's low-rank branch."""

    def _branch_ok(self, name: str) -> bool:
        """Whether adapter `name` is a plain LoRA that the low-rank branch computes exactly."""
        return name not in self.lora_variant and not self.lora_bias.get(name, False)

    def _fused_ok(self, kwargs: dict) -> bool:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return False
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if not self._branch_ok(name):
                return False
            if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
                return False
            if torch.is_grad_enabled() and (self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad):
                return False
        return True

    def _factors(self, base: SVDQLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name` as branch factors: (A diag(s), B * scaling) in the branch's dtype."""
        dtype, device = base.lowrank_down.dtype, base.lowrank_down.device
        a, b = self.lora_A[name].weight.detach().float().to(device), self.lora_B[name].weight.detach().float().to(device)
        return (a * base.smooth.float()).to(dtype), (b * float(self.scaling[name])).to(dtype)

    def _branch(self, base: SVDQLinear) -> tuple[torch.Tensor, torch.Tensor]:
        names = [n for n in self.active_adapters if n in self.lora_A and self.scaling[n] != 0]
        key = tuple((n, id(self.lora_A[n].weight), self.lora_A[n].weight._version, id(self.lora_B[n].weight),
                     self.lora_B[n].weight._version, self.scaling[n]) for n in names)
        key += ((id(base.lowrank_down), base.lowrank_down._version, id(base.smooth), base.smooth._version),)
        cache = self.__dict__.get("_dq_branch_cache")
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        factors = [self._factors(base, n) for n in names]
        down = torch.cat([base.lowrank_down] + [d for d, _ in factors], 0).contiguous()
        up = torch.cat([base.lowrank_up] + [u for _, u in factors], 1).contiguous()
        # Keep the tensors the key names alive, so their ids cannot be reused by other tensors.
        self.__dict__["_dq_branch_cache"] = (key, down, up, [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names])
        return down, up

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if args or not isinstance(base, SVDQLinear) or not self._fused_ok(kwargs):
            return super().forward(x, *args, **kwargs)
        down, up = self._branch(base)
        return base.forward_with_branch(x, down, up)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append the adapters to the SVDQ low-rank branch (exact; the branch's rank grows by theirs)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        unfit = [n for n in names if not self._branch_ok(n)]
        if unfit:
            raise DQError(
                f"fuse_lora cannot fold adapter(s) {unfit} into an SVDQuant layer: DoRA and LoRA biases are not a "
                "low-rank product. Keep them unfused (they run as PEFT's side branch). Nothing was fused."
            )
        base = self.get_base_layer()
        for name in names:
            down, up = self._factors(base, name)
            if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.extend_branch(down, up)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Remove the fused adapters from the branch again, last fused first (bit-identical to before)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.shrink_branch(self.lora_A[name].weight.shape[0])


def unfusable_layers(model: nn.Module, adapter_names: list[str] | None) -> list[str]:
    """Names of LoRA-wrapped quantized layers that `fuse_lora(adapter_names=...)` would have to refuse."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLoraLinear, QuantLoraConv2d, SVDQLoraLinear)):
            continue
        names = [n for n in check_adapters_to_merge(module, adapter_names) if n in module.lora_A]
        if names and (not isinstance(module, SVDQLoraLinear) or not all(module._branch_ok(n) for n in names)):
            found.append(name)
    return found


def adopt_lora_wrappers(model: nn.Module) -> int:
    """Give PEFT's LoRA wrappers around dq layers dq's subclass of their class; returns how many changed."""
    n = 0
    for module in model.modules():
        if type(module) not in (PeftLoraLinear, PeftLoraConv2d):
            continue
        base = module.get_base_layer()
        if isinstance(base, SVDQLinear):
            module.__class__ = SVDQLoraLinear
        elif isinstance(base, QuantLayerMixin):
            module.__class__ = QuantLoraLinear if type(module) is PeftLoraLinear else QuantLoraConv2d
        else:
            continue
        n += 1
    return n
