"""Block-sequential quantization: the pieces that let a calibrator work on one block of a denoiser at a time.

A denoiser's blocks are the children of its top-level ModuleLists (`transformer_blocks`,
`single_transformer_blocks`, `down_blocks`, `up_blocks`, ...) and its `mid_block`; the rest (patch and time
embeddings, norms, the projections in and out) is the glue, which the default skip rules keep in float.

- `BlockDenoiser` calls one block as if it were the denoiser, so every block-capable calibrator runs on it
  unchanged: the sample's timestep travels as the `timestep` keyword that timestep-aware quantizers key on.
  The block sits at its own path inside it, so its layers have the names they have in the denoiser: plans,
  logs and the per-unit batch orders of reconstruction (keyed by name) are the ones of in-memory calibration.
- `trace_block_flow` runs the denoiser once and records, for every block, which earlier blocks' outputs reach
  its inputs (through the glue, e.g. a UNet's skip connections): a driver keeps a block's outputs exactly as
  long as a later block needs them.
- `block_plan` is the whole denoiser's plan restricted to one block; `glue_plan` the rest (e.g. SVDQuant's
  weight-only adaLN linears), calibrated after the blocks.

Where the blocks' weights and activations live (memory or disk) is decided above the core
(`dq.pipelines.sequential`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dq.calib.quantize import QuantPlan
from dq.errors import DQError
from dq.nn.select import LayerSelection
from dq.sizes import nested_tensors


def denoiser_blocks(denoiser: nn.Module) -> dict[str, nn.Module]:
    """name -> block of every top-level ModuleList child and of the mid block, in registration order."""
    blocks: dict[str, nn.Module] = {}
    for name, child in denoiser.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.update({f"{name}.{i}": block for i, block in enumerate(child)})
        elif name == "mid_block" and child is not None:
            blocks[name] = child
    if not blocks:
        raise DQError(
            f"{type(denoiser).__name__} has no top-level block list (transformer_blocks, down_blocks, ...); "
            "block-sequential calibration needs one. Quantize it in memory with dq.quantize."
        )
    return blocks


def mount(container: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` inside `container` at the dotted `path` (plain parent modules are created), so that its
    submodules keep the names they have in the model it comes from."""
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(container, part):
            container.add_module(part, nn.Module())
        container = getattr(container, part)
    container.add_module(leaf, module)


class BlockDenoiser(nn.Module):
    """One block called as a denoiser, on keyword arguments only: `timestep` (one value per row) for the
    timestep-aware quantizers, and the block's own positional and keyword arguments (a block may take a
    `timestep` of its own: PixArt's adaLN embedding). The block is mounted at its name in the denoiser."""

    def __init__(self, name: str, block: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        # The first parameter sets the dtype calibration data is replayed in (CalibData.replay), as the
        # denoiser's does in memory; a block's own first one may be a quantized layer's FP16 low-rank factor.
        self.replay_dtype = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        self.block_name = name
        mount(self, name, block)

    def forward(self, timestep: torch.Tensor, block_args: tuple, block_kwargs: dict) -> Any:
        return self.get_submodule(self.block_name)(*block_args, **block_kwargs)


def block_inputs(timesteps: torch.Tensor, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments of a BlockDenoiser call for a block called with (args, kwargs)."""
    return {"timestep": timesteps, "block_args": args, "block_kwargs": kwargs}


def _restricted(plan: QuantPlan, keep: Callable[[str], bool]) -> QuantPlan:
    """`plan` with only the layers (planned and skipped) whose names `keep` accepts, with its calibrator."""
    def kept(names: dict) -> dict:
        return {n: v for n, v in names.items() if keep(n)}

    return QuantPlan(LayerSelection(kept(plan.selection.plans), kept(plan.selection.skipped)), plan.calibrator)


def in_blocks(name: str, blocks: list[str]) -> bool:
    """Whether the module or tensor `name` lies inside one of `blocks`."""
    return any(name.startswith(b + ".") for b in blocks)


def block_plan(plan: QuantPlan, block: str) -> QuantPlan:
    """`plan`'s layers inside `block`, with its calibrator."""
    return _restricted(plan, lambda n: in_blocks(n, [block]))


def glue_plan(plan: QuantPlan, blocks: list[str]) -> QuantPlan:
    """`plan`'s layers that lie in no block, with its calibrator."""
    return _restricted(plan, lambda n: not in_blocks(n, blocks))


GLUE = "glue"


@dataclass
class BlockFlow:
    """The blocks in call order; for each, the earlier blocks whose outputs reach its inputs; and the blocks
    whose outputs reach the inputs of the glue's quantized layers (`GLUE`, calibrated after every block)."""

    order: list[str]
    sources: dict[str, list[str]]

    def last_reader(self) -> dict[str, str]:
        """block -> the last block (or GLUE) that reads its outputs (blocks read by none are left out)."""
        last: dict[str, str] = {}
        for reader in [*self.order, GLUE]:
            for source in self.sources.get(reader, []):
                last[source] = reader
        return last


class _DataFlow(TorchFunctionMode):
    """Tags, outside the blocks, every tensor computed from a block's output with the blocks it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, frozenset[str]]] = {}  # id -> (tensor kept alive, sources)
        self.depth = 0

    def sources_of(self, obj: Any) -> frozenset[str]:
        found: set[str] = set()
        for _, t in nested_tensors(obj):
            entry = self.tags.get(id(t))
            if entry is not None and entry[0] is t:
                found |= entry[1]
        return frozenset(found)

    def tag(self, obj: Any, sources: frozenset[str]) -> None:
        for _, t in nested_tensors(obj):
            self.tags[id(t)] = (t, sources | self.sources_of(t))

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            sources = self.sources_of((args, kwargs))
            if sources:
                self.tag(out, sources)
                if args and (func is torch.Tensor.__setitem__ or getattr(func, "__name__", "").endswith("_")):
                    self.tag(args[0], sources)  # written in place
        return out


def trace_block_flow(blocks: dict[str, nn.Module], forward: Callable[[], Any], glue_layers: list[nn.Module] = ()) -> BlockFlow:
    """Run `forward` (one denoiser call) and record the blocks' call order and their data flow.

    The flow is the architecture's, the same for every input: a block's inputs depend on an earlier block
    when a tensor computed from that block's output (the output itself, or glue computed from it) is passed in.
    `glue_layers`: layers outside the blocks whose input sources are recorded under GLUE.
    """
    flow = _DataFlow()
    order: list[str] = []
    sources: dict[str, list[str]] = {}
    glue: set[str] = set()

    def read_by_glue(module: nn.Module, args: tuple) -> None:
        glue.update(flow.sources_of(args))

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if flow.depth == 0 and name not in sources:
                order.append(name)
                sources[name] = sorted(flow.sources_of((args, kwargs)), key=order.index)
            flow.depth += 1
        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            flow.depth -= 1
            if flow.depth == 0:
                flow.tag(output, frozenset([name]))
        return hook

    handles = [layer.register_forward_pre_hook(read_by_glue) for layer in glue_layers]
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(block.register_forward_hook(after(name), with_kwargs=True))
    try:
        with flow, torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in blocks if n not in sources]
    if missing:
        raise DQError(f"block(s) {missing[:5]} never ran in the denoiser's forward; block-sequential calibration needs every block to run.")
    if glue:
        sources[GLUE] = sorted(glue, key=order.index)
    return BlockFlow(order, sources)


__all__ = ["BlockDenoiser", "BlockFlow", "block_inputs", "GLUE", "block_plan", "denoiser_blocks", "glue_plan", "in_blocks", "mount", "trace_block_flow"]
