"""Byte counts of tensors and modules: the one place dq measures storage."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, recursing into the inner tensors of a tensor subclass."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def tensors_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once; None entries are ignored)."""
    unique = {id(t): t for t in tensors if t is not None}
    return sum(tensor_bytes(t) for t in unique.values())


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (packed codes count as stored)."""
    return tensors_bytes([*module.parameters(), *module.buffers()])


def nested_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from nested_tensors(o, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nested_tensors(v, f"{prefix}.{k}" if prefix else str(k))


def nested_bytes(obj: Any) -> int:
    """Bytes of the tensors inside nested tuples, lists and dicts."""
    return sum(tensor_bytes(t) for _, t in nested_tensors(obj))
