"""Quantize a checkpoint on disk without loading it: one layer in memory at a time, written out in shards.

`stream_quantize(path, recipe, out)` builds the denoiser's skeleton on the meta device, plans the recipe's
layers on it (the same plan `dq.quantize` makes), then walks the checkpoint's safetensors files: each planned
layer's float tensors are read, quantized and packed exactly as in memory, written to the current output shard
and freed; every other tensor is copied as stored. Peak memory is about one output shard plus one float layer,
whatever the model's size. The output is a diffusers model directory (sharded safetensors, an index, and
config.json with the quantization_config) that plain `from_pretrained` loads after `import dq`, equal to
`dq.quantize` of the same weights in memory. For a pipeline directory, the other components are copied.

Only data-free recipes stream; calibrated ones need the denoiser's activations: `dq.pipelines.sequential` calibrates
them one block at a time from a pipeline directory, with the same skeleton, checkpoint reader and shard writer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from dq.calib import plan_quantization
from dq.errors import DQError
from dq.io import atomic_directory, atomic_file, check_writable
from dq.metrics.perf import peak_memory
from dq.nn import QUANT_LAYER_TYPES, LayerPlan
from dq.pipelines.config import DQConfig
from dq.recipes import Recipe, load_recipe
from dq.sizes import tensor_bytes

logger = logging.getLogger(__name__)

DENOISER_FOLDERS = ("transformer", "unet")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_BYTES = 256 * 2**20
WORK_SUFFIX = ".dq-partial"
WORK_VERSION = 2  # the layout of a work directory (2: one outputs-<stream> directory per block-output stream)


@dataclass
class StreamReport:
    """What `stream_quantize` did: layers quantized, bytes in and out, and time and peak memory per stage."""

    recipe: str
    quantized: int = 0
    copied: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    stages: dict[str, tuple[float, int]] = field(default_factory=dict)  # stage -> (seconds, peak RSS bytes)

    def __str__(self) -> str:
        lines = [
            f"dq quantize (streamed) [{self.recipe}]: {self.quantized} layers quantized, {self.copied} tensors copied; "
            f"denoiser {self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB"
        ]
        lines += [f"  {stage}: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB" for stage, (seconds, peak) in self.stages.items()]
        return "\n".join(lines)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has it (else None)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS. glibc raises its mmap threshold after large frees, so
    later layer-sized buffers come from the heap and freed ones stay resident: without this, a streamed PixArt
    peaked at 1.2-3.0 GiB above start instead of 0.33 GiB (measured with benchmarks/stream_quantize.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def stage(report: StreamReport, name: str) -> Iterator[None]:
    """Record the block's seconds and peak RSS (the kernel's high-water mark, reset at the start) as a stage."""
    start = time.perf_counter()
    with peak_memory("cpu") as peak:
        yield
    report.stages[name] = (time.perf_counter() - start, peak.bytes)


def denoiser_directory(path: Path) -> tuple[Path, Path | None]:
    """(the denoiser's model directory, the pipeline directory or None) of a pipeline or model directory."""
    if (path / "model_index.json").is_file():
        for folder in DENOISER_FOLDERS:
            if (path / folder / "config.json").is_file():
                return path / folder, path
        raise DQError(f"pipeline directory {str(path)!r} has no {' or '.join(DENOISER_FOLDERS)} folder with a config.json.")
    if (path / "config.json").is_file():
        return path, None
    raise DQError(f"{str(path)!r} is neither a diffusers pipeline directory (model_index.json) nor a model directory (config.json).")


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model directory (one file, or shards with an index)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / WEIGHTS_NAME
    if not single.is_file():
        raise DQError(f"{str(model_dir)!r} has no {WEIGHTS_NAME} (or {INDEX_NAME}); streaming reads safetensors checkpoints only.")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def model_skeleton(model_dir: Path, buffers: bool = False) -> tuple[nn.Module, dict]:
    """The denoiser built from its config.json on the meta device (no memory), and that config.

    buffers: build the buffers for real (those computed at init and not stored, which a forward needs)."""
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise DQError(f"{str(model_dir)!r} is already quantized; stream the float checkpoint instead.")
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise DQError(f"config.json of {str(model_dir)!r} names class {config.get('_class_name')!r}, which diffusers does not have.")
    with init_empty_weights(include_buffers=not buffers):
        model = cls.from_config(config)
    return model, config


class ShardWriter:
    """Collects tensors and writes them as numbered safetensors shards of about `shard_bytes` each.

    Tensors are added in groups (`add`: one layer's, or one copied tensor); a shard is written only between
    groups, so a layer is never split between a written shard and lost pending ones. `written`: the shards an
    interrupted run wrote (their tensor names), continued after; `on_flush` is called after every shard.
    """

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES, written: list[list[str]] | None = None,
                 total: int = 0, on_flush: Callable[["ShardWriter"], None] | None = None) -> None:
        self.directory, self.shard_bytes, self.on_flush = directory, shard_bytes, on_flush
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = list(written or [])
        self.total = total

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += tensor_bytes(tensor)
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.directory / f"shard-{len(self.files):05d}.tmp"))
        self.files.append(list(self.pending))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0
        if self.on_flush is not None:
            self.on_flush(self)

    def finish(self) -> int:
        """Name the shards as diffusers does and write the index; returns the bytes written."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i:05d}.tmp").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.total


class WorkDir:
    """`<out>.dq-partial/`: what an interrupted run leaves behind, so that the same command continues it.

    `state` (job.json) holds the run's key (its model files, recipe and settings: a different run over an
    unfinished one is refused) and whatever progress the run records; `save` writes it atomically.
    """

    def __init__(self, out: Path, key: dict[str, Any]) -> None:
        self.path = out.with_name(out.name + WORK_SUFFIX)
        state = self.path / "job.json"
        self.resumed = state.is_file()
        if not self.resumed:
            self.path.mkdir(parents=True, exist_ok=True)
            self.state: dict[str, Any] = {"key": key}
            return
        self.state = json.loads(state.read_text())
        if self.state["key"] != key:
            raise DQError(
                f"{str(self.path)!r} holds an unfinished run of different settings (model, recipe or calibration); "
                "resume it with the same arguments, or delete that directory to start over."
            )
        logger.info("dq: resuming the unfinished run in %s", self.path)

    def save(self) -> None:
        with atomic_file(self.path / "job.json") as tmp:
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True, default=str))

    def remove(self) -> None:
        shutil.rmtree(self.path)


def run_key(model_dir: Path, files: dict[str, Path], recipe: Recipe, **settings: Any) -> dict[str, Any]:
    """What identifies a run over a checkpoint (its files' sizes, the recipe, other settings), as JSON values."""
    sizes = {p.name: p.stat().st_size for p in sorted(set(files.values()))}
    key = {"version": WORK_VERSION, "model": str(model_dir.resolve()), "files": sizes, "recipe": recipe.to_dict(), **settings}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _float_layer(skeleton: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The skeleton's layer `name` materialized on CPU with the checkpoint's tensors (cast to the layer's dtype,
    as from_pretrained loads them)."""
    layer = skeleton.get_submodule(name)
    layer.to_empty(device="cpu")
    layer.load_state_dict(tensors)
    return layer


def stream_quantize(path: str | Path, recipe: str | Recipe, out: str | Path, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES) -> StreamReport:
    """Quantize the denoiser of a pipeline or model directory on disk into `out`, one layer at a time.

    Args:
        path: a diffusers pipeline directory (model_index.json) or a model directory (config.json + safetensors).
        recipe: a data-free recipe (name, YAML path or Recipe).
        out: the output directory, written atomically; an existing one only with `overwrite`.
        shard_bytes: size of the output's safetensors shards (the memory held for writing).

    Example:
        >>> report = stream_quantize("PixArt-Sigma-XL/transformer", "w4a16", "pixart-w4a16")
        >>> PixArtTransformer2DModel.from_pretrained("pixart-w4a16")   # after `import dq`
    """
    path, out = Path(path).expanduser(), Path(out).expanduser()
    recipe = load_recipe(recipe)
    if recipe.needs_data:
        raise DQError(
            f"recipe {recipe.name!r} calibrates on data ({recipe.method}), which needs the whole pipeline; streaming "
            "quantizes data-free recipes only. Calibrate the pipeline directory block by block "
            "(dq.pipelines.sequential.sequential_quantize, which dq quantize runs) or in memory (dq.quantize)."
        )
    check_writable(out, overwrite)
    model_dir, pipeline_dir = denoiser_directory(path)
    report = StreamReport(recipe.name)
    with stage(report, "plan"):
        skeleton, config = model_skeleton(model_dir)
        files = checkpoint_files(model_dir)
        plans = plan_quantization(skeleton, recipe).selection.plans
    work = WorkDir(out, run_key(model_dir, files, recipe, shard_bytes=shard_bytes))
    with stage(report, "quantize + write"):
        consumed = set(work.state.get("consumed", []))

        def progress(writer: ShardWriter) -> None:  # every tensor read so far is in a written shard
            work.state.update(shards=writer.files, total=writer.total, consumed=sorted(consumed))
            work.save()

        writer = ShardWriter(work.path / "shards", shard_bytes, work.state.get("shards"), work.state.get("total", 0), progress)
        _write_tensors(skeleton, plans, files, writer, report, consumed)
        report.bytes_out = writer.finish()
    with stage(report, "copy components"), atomic_directory(out, overwrite=overwrite) as tmp:
        target = tmp if pipeline_dir is None else tmp / model_dir.name
        if pipeline_dir is not None:
            copy_other_components(pipeline_dir, model_dir.name, tmp)
        (work.path / "shards").rename(target)
        config["quantization_config"] = DQConfig(recipe=recipe.to_dict(), modules={n: p.to_dict() for n, p in plans.items()}).to_dict()
        (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    work.remove()
    return report


def read_tensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file, copied out of a mapping that is closed again at once, so the file's
    pages never accumulate in this process's resident memory."""
    with safe_open(str(file), framework="pt") as f:
        return {name: f.get_tensor(name) for name in names}


def _write_tensors(skeleton: nn.Module, plans: dict[str, LayerPlan], files: dict[str, Path], writer: ShardWriter,
                   report: StreamReport, consumed: set[str]) -> None:
    """Quantize each planned layer and copy every other tensor, in checkpoint order; the checkpoint tensors in
    `consumed` (written by an interrupted run) are skipped, and every tensor read is added to it."""
    layer_tensors: dict[str, list[str]] = {}
    for name in files:
        module = name.rpartition(".")[0]
        if module in plans:
            layer_tensors.setdefault(module, []).append(name)
    absent = sorted(set(plans) - set(layer_tensors))
    if absent:
        raise DQError(f"the checkpoint has no weights for layer(s) {absent[:5]} of {type(skeleton).__name__}; it does not match its config.json.")
    bar = tqdm(total=len(plans), initial=len({n.rpartition(".")[0] for n in consumed} & set(plans)),
               desc=f"dq: streaming {report.recipe}", leave=False)
    for name, file in files.items():
        if name in consumed:
            continue
        module = name.rpartition(".")[0]
        if module not in plans:
            tensor = read_tensors(file, [name])[name]
            report.bytes_in += tensor_bytes(tensor)
            consumed.add(name)
            writer.add({name: tensor})
            report.copied += 1
            continue
        keys = layer_tensors[module]
        tensors = {}
        for source in {files[k] for k in keys}:
            tensors.update(read_tensors(source, [k for k in keys if files[k] == source]))
        report.bytes_in += sum(tensor_bytes(t) for t in tensors.values())
        plan = plans[module]
        float_layer = _float_layer(skeleton, module, {k.rpartition(".")[2]: v for k, v in tensors.items()})
        layer = QUANT_LAYER_TYPES[plan.kind].from_float(float_layer, plan.weight, plan.act, **plan.options)
        layer.deploy()
        consumed.update(keys)
        writer.add({f"{module}.{key}": value for key, value in layer.state_dict().items()})
        skeleton.get_submodule(module).to(device="meta")  # free the float weight
        del layer, float_layer, tensors
        release_freed_memory()
        report.quantized += 1
        bar.update(1)
    bar.close()


def copy_other_components(pipeline_dir: Path, denoiser: str, out: Path) -> None:
    """Every file and folder of the pipeline except the denoiser, copied (not loaded)."""
    for item in pipeline_dir.iterdir():
        if item.name == denoiser:
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
