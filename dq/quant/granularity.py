"""Granularity: which elements share one scale.

Every granularity is expressed as a view of the tensor whose LAST dimension is
the set of elements that share a scale; statistics reduce over that dimension
and scales broadcast back over it. For weights the tensor is 2-D [out, in]
(conv weights are flattened to [out, in*kh*kw], the implicit-GEMM order); for
activations it is [..., in] with tokens in the leading dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dq.errors import DQError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of a [out, in] weight)."""

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 1, -1)


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements along the input (last) dimension of each row."""

    group_size: int

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        if k % self.group_size:
            raise DQError(
                f"input dimension {k} is not a multiple of the group size {self.group_size}; "
                "choose a group size that divides it, or skip this layer in the recipe."
            )
        return x.reshape(*x.shape[:-1], k // self.group_size, self.group_size)


@dataclass(frozen=True)
class PerToken:
    """Dynamic activation scales: one per token, or per token and group of `group_size` channels."""

    group_size: int | None = None

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return x.reshape(*x.shape[:-1], 1, x.shape[-1])
        return PerGroup(self.group_size).grouped(x)


@dataclass(frozen=True)
class Progressive:
    """Weights: QServe's progressive groups, per-channel INT8 then UINT4 groups of `group_size` with integer
    scales and zeros (dq.quant.progressive); the group's view is PerGroup's."""

    group_size: int

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return PerGroup(self.group_size).grouped(x)


Granularity = PerTensor | PerChannel | PerGroup | PerToken | Progressive


def granularity_from_name(name: str, group_size: int | None = None) -> Granularity:
    """Build a granularity from its recipe name: tensor, channel, group or progressive (need group_size), token."""
    if name == "tensor":
        return PerTensor()
    if name == "channel":
        return PerChannel()
    if name == "group":
        if not group_size:
            raise DQError("granularity 'group' needs a positive group_size in the recipe.")
        return PerGroup(group_size)
    if name == "token":
        return PerToken(group_size)
    if name == "progressive":
        if not group_size:
            raise DQError("granularity 'progressive' needs a positive group_size in the recipe (QServe uses 128).")
        return Progressive(group_size)
    raise DQError(f"unknown granularity {name!r}; allowed: tensor, channel, group, progressive, token.")


def granularity_name(g: Granularity) -> str:
    """Inverse of granularity_from_name (without the group size)."""
    return {PerTensor: "tensor", PerChannel: "channel", PerGroup: "group", PerToken: "token", Progressive: "progressive"}[type(g)]
