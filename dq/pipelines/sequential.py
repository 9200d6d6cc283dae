"""Block-sequential calibration of a pipeline on disk: one float block of the denoiser in memory at a time.

`sequential_quantize(path, recipe, out)` quantizes the denoiser of a diffusers pipeline directory with a
calibrated recipe without ever holding the float denoiser in memory:

1. Capture. The FP pipeline runs once on the calibration prompts with the denoiser streamed: its glue
   (embeddings, norms, projections in and out) is loaded, and each block is read from the safetensors files
   just before it runs and freed after. The denoiser's inputs at the calibration steps are stored in the work
   directory, and one traced call records which blocks' outputs reach which blocks' inputs
   (`dq.calib.sequential.trace_block_flow`). Text encoders and VAE are freed when this ends.
2. Prelude, for methods with layers that span the blocks (TFMQ's temporal block: a UNet's time embedding and
   every resnet's `time_emb_proj`): those layers alone are read and calibrated on the whole denoiser from the
   timesteps alone, before any block (`Calibrator.prelude_layers`). Redone on resume: it takes seconds.
3. Blocks, in call order. A block's inputs are recomputed by the denoiser's own forward, with the blocks
   before it replaying their stored outputs instead of running, and stopped at the block; held in memory up to
   `max_memory`, spilled to disk beyond it. The float block is read, its layers swapped, calibrated on those
   inputs by the recipe's calibrator (through `BlockDenoiser`) and packed; its tensors are written and it is
   freed. Its outputs are stored for the blocks that read them, in every quantization state the method's
   replays use in memory (`Calibrator.streams`), so a block sees what the whole model in that state gives it:
   QUANTIZED, the calibrated block in simulation (BRECQ's activation phase); FLOAT, the swapped block with its
   quantizers bypassed, before calibration (reconstruction targets; SVDQuant's and SmoothQuant's smoothing, low
   rank and GPTQ Hessians, which their papers take from the float model); WEIGHTS, the calibrated block in
   simulation with its activations in float (reconstructed weights' inputs; the activation ranges of
   Q-Diffusion, TFMQ, PTQ4DM and the timestep observer). Every block's inputs and outputs are computed on the
   batches of samples the calibrator replays together (`Calibrator.replay_groups`), so for a method that
   replays one batching they are bitwise the ones in-memory calibration computes. The float model is still
   never resident.
4. Glue: the layers outside the blocks, calibrated with every block replaying.
5. Write. The output directory is assembled atomically, as `stream_quantize` writes it.

Each finished block is recorded in `<out>.dq-partial/` (`dq.pipelines.streaming.WorkDir`); a run interrupted at any point continues at the first
unfinished block when started again with the same arguments. Memory: the glue, one float block, and the
calibration activations of one block boundary per stream (those beyond `max_memory` on disk).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dq.calib import CalibData, CalibSample, plan_quantization, quantize_model
from dq.calib.data import FLOAT, QUANT_STATES, QUANTIZED, WEIGHTS, collate, collate_samples, map_tensors, split
from dq.calib.quantize import QuantPlan
from dq.calib.sequential import GLUE, BlockDenoiser, BlockFlow, block_inputs, block_plan, denoiser_blocks, glue_plan, in_blocks, trace_block_flow
from dq.calib.state import quant_state
from dq.calib.timestep import attach_timestep_hook, grouped_quantizers
from dq.errors import DQError
from dq.io import atomic_directory, atomic_file, check_writable
from dq.nn import deploy_all, plan_of, quant_layers, swap_layers
from dq.nn.select import LayerSelection
from dq.pipelines.calibration import CalibConfig, calibration_data, load_data, save_data
from dq.pipelines.config import DQConfig
from dq.pipelines.loading import components_saved_as_none
from dq.pipelines.streaming import (
    SHARD_BYTES,
    ShardWriter,
    StreamReport,
    WorkDir,
    checkpoint_files,
    copy_other_components,
    denoiser_directory,
    model_skeleton,
    read_tensors,
    release_freed_memory,
    run_key,
    stage,
)
from dq.recipes import Recipe, load_recipe
from dq.sizes import nested_bytes

logger = logging.getLogger(__name__)

MAX_MEMORY = 4 * 2**30


class _Reached(Exception):
    """Raised at the block whose inputs are being captured, to end the denoiser's forward there."""


# -- the float checkpoint, module by module -----------------------------------------------------------------
class Checkpoint:
    """The denoiser's safetensors files, read one module's tensors at a time into a skeleton."""

    def __init__(self, skeleton: nn.Module, files: dict[str, Path]) -> None:
        self.skeleton, self.files = skeleton, files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in {self.files[n] for n in names}:
            tensors.update(read_tensors(file, [n for n in names if self.files[n] == file]))
        return tensors

    def _load(self, module: nn.Module, expected: list[str], prefix: str) -> None:
        """Put the checkpoint's tensors `expected` (names inside `module`) into `module`, cast to its dtypes as
        from_pretrained casts them; buffers computed at init and not stored are kept."""
        full = {f"{prefix}.{n}" if prefix else n: n for n in expected}
        missing = sorted(n for n in full if n not in self.files)
        if missing:
            raise DQError(f"the checkpoint has no tensors {missing[:5]}; it does not match its config.json.")
        current = module.state_dict()
        tensors = {full[n]: t for n, t in self.read(list(full)).items()}
        cast = {n: t.to(current[n].dtype) if t.is_floating_point() else t for n, t in tensors.items()}
        module.load_state_dict(cast, strict=False, assign=True)

    def load_module(self, name: str) -> nn.Module:
        """The module `name` of the skeleton (a block, or one layer), its unmaterialized (meta) tensors read from
        the checkpoint; a layer already swapped in by a prelude keeps its own."""
        module = self.skeleton.get_submodule(name)
        self._load(module, [n for n, t in module.state_dict().items() if t.is_meta], name)
        return module

    def load_glue(self, blocks: list[str]) -> None:
        """Materialize everything of the skeleton outside the blocks."""
        glue = [n for n in self.skeleton.state_dict() if not in_blocks(n, blocks)]
        self._load(self.skeleton, glue, "")


class _StreamedBlocks:
    """Context: every block is read from the checkpoint just before it runs and freed right after."""

    def __init__(self, checkpoint: Checkpoint, blocks: dict[str, nn.Module]) -> None:
        self.checkpoint, self.blocks, self.handles = checkpoint, blocks, []

    def __enter__(self) -> "_StreamedBlocks":
        for name, block in self.blocks.items():
            self.handles.append(block.register_forward_pre_hook(lambda m, a, n=name: self.checkpoint.load_module(n) and None))
            self.handles.append(block.register_forward_hook(lambda m, a, out: _free(m)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _free(module: nn.Module) -> None:
    module.to(device="meta")
    release_freed_memory()


# -- replaying the blocks before the one being calibrated --------------------------------------------------
class _Outputs:
    """One stream's outputs of finished blocks (the model's in one quantization state), one file per block
    and sample, kept while a later block reads them; and the shape of every output (a block nobody reads still
    returns zeros of its shape to the glue)."""

    def __init__(self, root: Path) -> None:
        self.values, self.shapes = root / "values", root / "shapes"

    def save(self, block: str, sample: int, output: Any, keep: bool) -> None:
        for root, obj in ((self.shapes, map_tensors(output, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))),
                          (self.values, map_tensors(output, lambda t: t.detach().clone()) if keep else None)):
            if obj is not None:
                (root / block).mkdir(parents=True, exist_ok=True)
                torch.save(obj, root / block / f"{sample:05d}.pt")

    def replay(self, block: str, samples: list[int], rows: list[int], read: bool) -> Any:
        """The block's stored outputs for `samples` (collated along rows), or zeros of their shape when the
        module being fed does not read them."""
        if read:
            outs = [torch.load(self.values / block / f"{i:05d}.pt", weights_only=True) for i in samples]
        else:
            shapes = [torch.load(self.shapes / block / f"{i:05d}.pt", weights_only=True) for i in samples]
            outs = [map_tensors(shape, lambda t: torch.zeros(t.shape, dtype=t.dtype)) for shape in shapes]
        return collate(outs, rows)

    def drop(self, block: str) -> None:
        """Forget the block's output values: the last block reading them is done."""
        shutil.rmtree(self.values / block, ignore_errors=True)


class _Replaying:
    """Context: the named blocks return the current stream's stored outputs for the current samples instead of
    running (`outputs` may be switched between streams inside)."""

    def __init__(self, blocks: dict[str, nn.Module], names: list[str], outputs: _Outputs, reads: set[str]) -> None:
        self.blocks, self.names, self.outputs, self.reads = blocks, names, outputs, reads
        self.samples: list[int] = []
        self.rows: list[int] = []

    def __enter__(self) -> "_Replaying":
        for b in self.names:
            self.blocks[b].forward = lambda *a, _b=b, **k: self.outputs.replay(_b, self.samples, self.rows, _b in self.reads)
        return self

    def __exit__(self, *exc: Any) -> None:
        for b in self.names:
            self.blocks[b].__dict__.pop("forward", None)


class GlueDenoiser(nn.Module):
    """The denoiser with every block replaying its stored outputs, called as a denoiser on keyword arguments
    only (`timestep` for the quantizers, `sample`: each row's sample index, `stream`: whose outputs the blocks
    replay), to calibrate the glue's layers. The denoiser's children are mounted at their own names (as the
    block in a BlockDenoiser), so the glue's layers keep their names."""

    def __init__(self, denoiser: nn.Module, replaying: _Replaying, streams: dict[str, _Outputs]) -> None:
        super().__init__()
        self.replay_dtype = nn.Parameter(torch.empty(0), requires_grad=False)  # see BlockDenoiser
        for name, child in denoiser.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "denoiser", denoiser)  # called, not registered: its children are
        self.replaying = replaying
        self.streams = streams

    def forward(self, timestep: torch.Tensor, sample: torch.Tensor, args: tuple, kwargs: dict, stream: str = QUANTIZED) -> Any:
        ids, counts = sample.unique_consecutive(return_counts=True)
        self.replaying.samples, self.replaying.rows = ids.tolist(), counts.tolist()
        self.replaying.outputs = self.streams[stream]
        return self.denoiser(*args, **kwargs)


def _replay_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A stored denoiser call, as the float32 skeleton takes it."""
    cast = lambda t: t.to(dtype=torch.float32) if t.is_floating_point() else t  # noqa: E731
    return map_tensors(args, cast), map_tensors(kwargs, cast)


def capture_block_inputs(denoiser: nn.Module, blocks: dict[str, nn.Module], flow: BlockFlow, name: str, data: CalibData,
                         streams: dict[str, _Outputs], spill: Path, max_memory: int, groups: list[list[int]]) -> CalibData:
    """The inputs of block `name` for every sample: the denoiser's forward with the earlier blocks replaying
    their stored outputs, stopped at the block, once per stream (in the stream's quantization state, its
    outputs replayed), on the samples of each of `groups` (indices into `data`) together, as the calibrator
    replays them in memory. In memory up to `max_memory` bytes, then spilled to `spill`."""
    found: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found["inputs"] = map_tensors((args, kwargs), lambda t: t.detach().clone())
        raise _Reached

    def inputs_in(stream: str, group: list[int]) -> list[dict]:
        members = [data.samples[i] for i in group]
        rows = [s.rows for s in members]
        replaying.samples, replaying.rows, replaying.outputs = group, rows, streams[stream]
        found.clear()
        batch = collate_samples(members)
        args, kwargs = _replay_inputs(batch.args, batch.kwargs)
        weights, acts = QUANT_STATES[stream]
        with quant_state(denoiser, weights=weights, acts=acts):
            try:
                denoiser(*args, **kwargs)
            except _Reached:
                pass
        if "inputs" not in found:
            raise DQError(f"block {name!r} did not run for calibration samples {group}; block-sequential calibration needs every block to run on every sample.")
        return [block_inputs(torch.full((s.rows,), s.timestep), *inputs) for s, inputs in zip(members, split(found["inputs"], rows))]

    samples: dict[int, CalibSample] = {}
    held = 0
    handle = blocks[name].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _Replaying(blocks, flow.order[: flow.order.index(name)], streams[QUANTIZED], set(flow.sources[name])) as replaying, torch.no_grad():
            for group in groups:
                by_stream = {stream: inputs_in(stream, group) for stream in streams}
                for j, i in enumerate(group):
                    s = data.samples[i]
                    others = {stream: inputs[j] for stream, inputs in by_stream.items() if stream != QUANTIZED}
                    sample = CalibSample(s.step, s.timestep, s.prompt, (), by_stream[QUANTIZED][j], s.rows, stream_kwargs=others)
                    held += nested_bytes(sample.all_inputs())
                    if held > max_memory:
                        sample.spill(spill / f"{i:05d}.pt")
                    samples[i] = sample
    finally:
        handle.remove()
    return CalibData([samples[i] for i in range(len(data.samples))], data.schedule, data.drawn)


def glue_data(data: CalibData, streams: list[str]) -> CalibData:
    """The denoiser's calibration samples as GlueDenoiser calls, once per stream."""
    samples = []
    for i, s in enumerate(data.samples):
        args, kwargs = s.inputs()
        kw = {"timestep": torch.full((s.rows,), s.timestep), "sample": torch.full((s.rows,), i), "args": args, "kwargs": kwargs}
        others = {stream: {**kw, "stream": stream} for stream in streams if stream != QUANTIZED}
        samples.append(CalibSample(s.step, s.timestep, s.prompt, (), kw, s.rows, stream_kwargs=others))
    return CalibData(samples, data.schedule, data.drawn)


# -- the driver ------------------------------------------------------------------------------------------
def sequential_quantize(path: str | Path, recipe: str | Recipe, out: str | Path, calib: CalibConfig | None = None,
                        max_memory: int = MAX_MEMORY, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> StreamReport:
    """Quantize the denoiser of a pipeline directory with a calibrated recipe, one float block in memory at a time.

    Args:
        path: a diffusers pipeline directory (its text encoders and VAE generate the calibration data).
        recipe: a calibrated recipe (name, YAML path or Recipe) whose method calibrates block by block.
        out: the output pipeline directory, written atomically; an existing one only with `overwrite`.
        calib: how calibration data is collected (as for dq.quantize); None: the bundled default.
        max_memory: bytes of one block's calibration inputs held in memory; the rest is read from disk.
        shard_bytes: size of the output's safetensors shards.

    Example:
        >>> report = sequential_quantize("my-sdxl-finetune", "svdquant-w4a4", "my-sdxl-w4a4")
        >>> print(report)   # time and peak memory per stage and per block
    """
    path, out = Path(path).expanduser(), Path(out).expanduser()
    recipe = load_recipe(recipe)
    if not recipe.needs_data:
        raise DQError(f"recipe {recipe.name!r} is data-free; stream it with dq.pipelines.streaming.stream_quantize (dq quantize does).")
    if not isinstance(max_memory, int) or max_memory < 0:
        raise DQError(f"max_memory must be a byte count >= 0, got {max_memory!r}.")
    check_writable(out, overwrite)
    model_dir, pipeline_dir = denoiser_directory(path)
    if pipeline_dir is None:
        raise DQError(
            f"recipe {recipe.name!r} calibrates on the pipeline's outputs, and {str(path)!r} is a model directory; "
            "pass the pipeline directory (model_index.json, text encoders, VAE, scheduler)."
        )
    report = StreamReport(recipe.name)
    with stage(report, "plan"):
        skeleton, config = model_skeleton(model_dir, buffers=True)
        files = checkpoint_files(model_dir)
        plan = plan_quantization(skeleton, recipe)
        blocks = denoiser_blocks(skeleton)
        prelude = plan.calibrator.prelude_layers(skeleton, plan.selection)
        rest = QuantPlan(LayerSelection({n: p for n, p in plan.selection.plans.items() if n not in prelude}, plan.selection.skipped),
                         plan.calibrator.block_calibrator())
        checkpoint = Checkpoint(skeleton, files)
        checkpoint.load_glue(list(blocks))
    calib_settings = None if calib is None else asdict(calib)
    work = WorkDir(out, run_key(model_dir, files, recipe, calib=calib_settings, max_memory=max_memory))
    done: dict[str, dict] = work.state.setdefault("done", {})  # block (or GLUE) -> {layer name: layer plan}
    glue_layers = [n for n in plan.selection.plans if not in_blocks(n, list(blocks))]
    with stage(report, "capture"):
        data, flow = _capture(work, checkpoint, blocks, [skeleton.get_submodule(n) for n in glue_layers],
                              pipeline_dir, model_dir.name, recipe, calib)
    if prelude:
        with stage(report, "prelude"):
            for name in prelude:
                checkpoint.load_module(name)
            planned = {n: plan.selection.plans[n] for n in prelude if n in plan.selection.plans}
            layers = swap_layers(skeleton, planned)
            plan.calibrator.calibrate_prelude(skeleton, layers, data)
            # The glue's prelude layers select their timestep groups in the skeleton; a block's, in its BlockDenoiser.
            attach_timestep_hook(skeleton, [q for n, layer in layers.items() if not in_blocks(n, list(blocks)) for q in grouped_quantizers(layer)])
    streams = {stream: _Outputs(work.path / f"outputs-{stream}") for stream in (QUANTIZED, *plan.calibrator.streams)}
    last_reader = flow.last_reader()
    index = {id(s): i for i, s in enumerate(data.samples)}
    groups = [[index[id(s)] for s in group] for group in rest.calibrator.replay_groups(data)]
    for name in tqdm(flow.order, desc=f"dq: block-sequential {recipe.name}", leave=False):
        if name in done:
            continue
        with stage(report, f"block {name}"):
            block_data = capture_block_inputs(skeleton, blocks, flow, name, data, streams, work.path / "inputs" / name, max_memory, groups)
            done[name] = _quantize_block(checkpoint, name, recipe, rest, block_data, streams, work.path, name in last_reader, groups)
            for source, reader in last_reader.items():
                if reader == name:
                    for outputs in streams.values():
                        outputs.drop(source)
            shutil.rmtree(work.path / "inputs" / name, ignore_errors=True)
            del block_data
            release_freed_memory()
        work.save()
        seconds, peak = report.stages[f"block {name}"]
        logger.info("dq: block %s done (%d/%d): %.1f s, peak RSS %.0f MiB", name, len(done), len(flow.order), seconds, peak / 2**20)
    if glue_layers and GLUE not in done:
        with stage(report, "glue"):
            done[GLUE] = _quantize_glue(skeleton, blocks, flow, recipe, glue_plan(rest, list(blocks)), data, streams, work.path)
        work.save()
    report.quantized = sum(len(plans) for plans in done.values())
    with stage(report, "write"):
        _write_output(out, overwrite, pipeline_dir, model_dir.name, config, files, flow, done, recipe, work.path, shard_bytes, report)
    work.remove()
    return report


def _capture(work: WorkDir, checkpoint: Checkpoint, blocks: dict[str, nn.Module], glue_layers: list[nn.Module],
             pipeline_dir: Path, denoiser_name: str, recipe: Recipe, calib: CalibConfig | None) -> tuple[CalibData, BlockFlow]:
    """The denoiser's calibration inputs and the blocks' data flow: from the work directory, else by running the
    FP pipeline with the denoiser streamed block by block."""
    stored = work.path / "capture.pt"
    if "flow" in work.state and stored.is_file():
        return load_data(stored), BlockFlow(**work.state["flow"])
    skeleton = checkpoint.skeleton
    with _StreamedBlocks(checkpoint, blocks):
        components = {**components_saved_as_none(pipeline_dir), denoiser_name: skeleton}
        pipe = DiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, **components)
        try:
            data = calibration_data(pipe, recipe, calib)
        finally:
            del pipe
            gc.collect()
            release_freed_memory()
        args, kwargs = _replay_inputs(*data.samples[0].inputs())
        flow = trace_block_flow(blocks, lambda: skeleton(*args, **kwargs), glue_layers)
    save_data(data, stored)
    work.state["flow"] = asdict(flow)
    work.save()
    return data, flow


def _store_outputs(model: nn.Module, name: str, data: CalibData, outputs: _Outputs, keep: bool, stream: str, groups: list[list[int]]) -> None:
    """The block's outputs in `stream`: on the stream's inputs, in its quantization state, the samples of each
    of `groups` in one call."""
    weights, acts = QUANT_STATES[stream]
    with torch.no_grad(), quant_state(model, weights=weights, acts=acts):
        for group in groups:
            batch = collate_samples([data.samples[i] for i in group])
            for i, output in zip(group, split(data.replay(model, batch, stream), [s.rows for s in batch.samples])):
                outputs.save(name, i, output, keep)


def _quantize_block(checkpoint: Checkpoint, name: str, recipe: Recipe, plan: QuantPlan, data: CalibData, streams: dict[str, _Outputs],
                    work: Path, keep: bool, groups: list[list[int]]) -> dict[str, dict]:
    """Read, calibrate, quantize and store one block, and store its outputs in every stream, each in the
    state in-memory calibration replays the blocks before in: FLOAT from the swapped block with its quantizers
    bypassed, before calibration (SVDQuant's swap already splits a weight into residual and branch); WEIGHTS
    and QUANTIZED from the calibrated block in simulation (activation quantizers off for WEIGHTS). Returns
    its layers' plans."""
    block = checkpoint.load_module(name)
    model = BlockDenoiser(name, block, torch.float32)
    plan = block_plan(plan, name)
    layers = swap_layers(model, plan.selection.plans)
    if FLOAT in streams:  # quant_state turns a prelude layer inside off too
        _store_outputs(model, name, data, streams[FLOAT], keep, FLOAT, groups)
    plan.calibrator.calibrate(model, layers, recipe, data)
    attach_timestep_hook(model)
    for stream in (WEIGHTS, QUANTIZED):
        if stream in streams:
            _store_outputs(model, name, data, streams[stream], keep, stream, groups)
    deploy_all(model)  # with the prelude's layers inside the block
    _save_tensors(work / "blocks" / f"{name}.safetensors", {f"{name}.{k}": v for k, v in block.state_dict().items()})
    _free(block)
    return {n: plan_of(layer).to_dict() for n, layer in quant_layers(model)}


def _quantize_glue(skeleton: nn.Module, blocks: dict[str, nn.Module], flow: BlockFlow, recipe: Recipe, glue: QuantPlan,
                   data: CalibData, streams: dict[str, _Outputs], work: Path) -> dict[str, dict]:
    """Calibrate and quantize the layers outside the blocks, with every block replaying its outputs, and pack
    the prelude's layers there."""
    with _Replaying(blocks, flow.order, streams[QUANTIZED], set(flow.sources.get(GLUE, []))) as replaying:
        model = GlueDenoiser(skeleton, replaying, streams)
        if glue.selection.plans:
            quantize_model(model, recipe, glue_data(data, list(streams)), glue)
    deploy_all(skeleton)
    names = list(blocks)
    _save_tensors(work / "glue.safetensors", {k: v for k, v in skeleton.state_dict().items() if not in_blocks(k, names)})
    return {n: plan_of(layer).to_dict() for n, layer in quant_layers(skeleton) if not in_blocks(n, names)}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _write_output(out: Path, overwrite: bool, pipeline_dir: Path, denoiser_name: str, config: dict, files: dict[str, Path],
                  flow: BlockFlow, done: dict[str, dict], recipe: Recipe, work: Path, shard_bytes: int, report: StreamReport) -> None:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        copy_other_components(pipeline_dir, denoiser_name, tmp)
        target = tmp / denoiser_name
        target.mkdir()
        writer = ShardWriter(target, shard_bytes)
        if GLUE in done:
            writer.add(load_file(str(work / "glue.safetensors")))
        else:
            for name in (n for n in files if not in_blocks(n, flow.order)):
                writer.add(read_tensors(files[name], [name]))
                report.copied += 1
        for block in flow.order:
            writer.add(load_file(str(work / "blocks" / f"{block}.safetensors")))
        report.bytes_out = writer.finish()
        report.bytes_in = sum(p.stat().st_size for p in set(files.values()))
        modules = {n: p for plans in done.values() for n, p in plans.items()}
        config["quantization_config"] = DQConfig(recipe=recipe.to_dict(), modules=modules).to_dict()
        (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")



__all__ = ["MAX_MEMORY", "sequential_quantize"]
