"""CacheQuant: DeepCache / block caching with a DP-optimised schedule and decoupled error correction.

`calibrate_cachequant(pipe, calls, ...)` records the cached feature's trajectory on calibration calls,
solves CacheQuant's DP for the refresh steps (with the quantized model's features against the FP ones
when an FP pipeline is given, so the quantization error enters the cost), then fits DEC: a per-step,
per-channel affine correction of the reused feature and a per-output-channel correction of the layers
that consume it on cached steps. The result is a CacheQuantConfig; `save_pretrained(dir)` writes
`dq_cache.json` + `dq_cache.safetensors` and `CacheQuantConfig.from_pretrained(dir)` reloads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dq.cache.api import disable_cache, enable_cache, record_trajectory
from dq.cache.block_cache import BlockCacheConfig, apply_block_cache, resolve_range
from dq.cache.blocks import dit_blocks
from dq.cache.config import CacheConfig, register_cache_method
from dq.cache.dec import DEC_FITS, LAYER_HOOK, OutputAffineHook, channel_affine_fit
from dq.cache.deepcache import DeepCacheConfig, apply_deepcache, plan_deepcache
from dq.cache.handle import CacheHandle, FeatureCorrection
from dq.cache.schedule import dp_schedule, l1_cost_matrix, validate_refresh_steps
from dq.errors import DQError
from dq.io import atomic_file
from dq.nn.denoiser import find_denoiser

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

CONFIG_FILE = "dq_cache.json"
TENSOR_FILE = "dq_cache.safetensors"


@dataclass
class CacheQuantConfig(CacheConfig):
    """[CacheQuant](https://arxiv.org/abs/2503.01323): DP schedule (DPS) + decoupled error correction (DEC).

    Args:
        base: "deepcache" (UNet), "block-cache" (DiT) or "auto" (by denoiser type).
        branch / blocks: the base method's cached branch (UNet) or block range (DiT).
        refresh_steps: the DP schedule (set by calibrate_cachequant); without it the schedule is uniform.
        feature_scale / feature_shift: DEC cache correction per cached step ([C] tensors).
        layer_scale / layer_shift: DEC quantization correction per consumer layer name ([out] tensors).

    Example:
        >>> config = calibrate_cachequant(qpipe, calls, interval=5, fp_pipe=fp_pipe)
        >>> config.save_pretrained("out/cache"); dq.enable_cache(qpipe, CacheQuantConfig.from_pretrained("out/cache"))
    """

    method = "cachequant"
    paper = "https://arxiv.org/abs/2503.01323"

    base: str = "auto"
    branch: int = 0
    blocks: tuple[int, int] = (1, -1)
    feature_scale: dict[int, torch.Tensor] = field(default_factory=dict, metadata={"tensor": True}, repr=False)
    feature_shift: dict[int, torch.Tensor] = field(default_factory=dict, metadata={"tensor": True}, repr=False)
    layer_scale: dict[str, torch.Tensor] = field(default_factory=dict, metadata={"tensor": True}, repr=False)
    layer_shift: dict[str, torch.Tensor] = field(default_factory=dict, metadata={"tensor": True}, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blocks = tuple(int(b) for b in self.blocks)
        if self.base not in ("auto", "deepcache", "block-cache"):
            raise DQError(f"cachequant base must be 'auto', 'deepcache' or 'block-cache', got {self.base!r}.")

    def base_config(self, denoiser: nn.Module) -> CacheConfig:
        base = self.base
        if base == "auto":
            base = "deepcache" if hasattr(denoiser, "down_blocks") else "block-cache"
        shared = dict(interval=self.interval, schedule=self.schedule, start=self.start, center=self.center,
                      power=self.power, refresh_steps=self.refresh_steps, num_inference_steps=self.num_inference_steps)
        if base == "deepcache":
            return DeepCacheConfig(branch=self.branch, **shared)
        return BlockCacheConfig(blocks=self.blocks, **shared)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write dq_cache.json (schedule, fields) and dq_cache.safetensors (DEC tensors) into `directory`.

        Each file is replaced atomically, the tensors first: an interrupted save leaves the previous config
        (or none) readable, never a half-written one.
        """
        tensors = {f"feature_scale.{k}": v for k, v in self.feature_scale.items()}
        tensors |= {f"feature_shift.{k}": v for k, v in self.feature_shift.items()}
        tensors |= {f"layer_scale.{k}": v for k, v in self.layer_scale.items()}
        tensors |= {f"layer_shift.{k}": v for k, v in self.layer_shift.items()}
        with atomic_file(os.path.join(directory, TENSOR_FILE)) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with atomic_file(os.path.join(directory, CONFIG_FILE)) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CacheQuantConfig":
        """Reload a config written by save_pretrained (tensors bit-exact)."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise DQError(f"no {CONFIG_FILE} in {directory}; expected a directory written by CacheQuantConfig.save_pretrained.")
        with open(path) as f:
            config = cls.from_dict(json.load(f))
        tensor_path = os.path.join(directory, TENSOR_FILE)
        tensors = load_file(tensor_path) if os.path.isfile(tensor_path) else {}
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            getattr(config, kind)[int(name) if kind.startswith("feature") else name] = value
        return config


def consumer_layers(denoiser: nn.Module, config: CacheQuantConfig) -> dict[str, nn.Module]:
    """The conv/linear layers that read the reused feature first: DeepCache's first running up resnet's
    `conv_shortcut` (reads cat[feature, skip]) and `conv1` (after its norm); the first block after the
    cached range for block caching, whose attention projections read the corrected hidden states."""
    base = config.base_config(denoiser)
    modules = dict(denoiser.named_modules())
    if isinstance(base, DeepCacheConfig):
        plan = plan_deepcache(denoiser, base.branch)
        names = [u.name for u in plan.units]
        first_run = names[names.index(plan.feature) + 1]
        picks = [f"{first_run}.conv_shortcut", f"{first_run}.conv1"]
    else:
        blocks = dit_blocks(denoiser)
        _, end = resolve_range(base.blocks, len(blocks), type(denoiser).__name__)
        if end >= len(blocks):
            return {}
        prefix = blocks[end][0]
        picks = [n for n, m in modules.items() if n.startswith(prefix + ".attn1.to_") and isinstance(m, nn.Linear)]
    return {n: modules[n] for n in picks if n in modules and isinstance(modules[n], (nn.Conv2d, nn.Linear))}


@register_cache_method(CacheQuantConfig)
def apply_cachequant(denoiser: nn.Module, config: CacheQuantConfig, handle: CacheHandle) -> None:
    """Register the base method's hooks with the DP schedule, plus the DEC corrections if fitted.

    Example:
        >>> dq.enable_cache(pipe, CacheQuantConfig.from_pretrained("out/cache"))   # the public entry point
    """
    base = config.base_config(denoiser)
    (apply_deepcache if isinstance(base, DeepCacheConfig) else apply_block_cache)(denoiser, base, handle)
    if config.feature_scale:
        handle.correction = FeatureCorrection(dict(config.feature_scale), dict(config.feature_shift),
                                              handle.info["channel_dim"])
    modules = dict(denoiser.named_modules())
    for name, scale in config.layer_scale.items():
        if name not in modules:
            raise DQError(f"cachequant DEC corrects layer {name!r}, which {type(denoiser).__name__} does not have.")
        dim = 1 if isinstance(modules[name], nn.Conv2d) else -1
        handle.register(modules[name], OutputAffineHook(handle, scale, config.layer_shift[name], dim), LAYER_HOOK)


def _segment_start(refresh_steps: tuple[int, ...], step: int) -> int:
    return max(s for s in refresh_steps if s <= step)


def calibrate_cachequant(
    pipe: DiffusionPipeline,
    calls: list[dict[str, Any]],
    interval: int = 5,
    fp_pipe: DiffusionPipeline = None,
    dec: str | None = "affine",
    **fields: Any,
) -> CacheQuantConfig:
    """Calibrate CacheQuant on `pipe` (quantized or not): DP refresh steps, then DEC.

    Args:
        pipe: the pipeline to cache (typically quantized with dq.quantize); no cache may be enabled on it.
        calls: pipeline keyword arguments per calibration call (prompts/embeddings, num_inference_steps,
            a seeded generator); all with the same num_inference_steps.
        interval: N; the DP picks ceil(T/N) refresh steps with segments of length in [ceil(N/2), 2N].
        fp_pipe: the full-precision pipeline; its features are the target (cost ||F_i^fp - F_c^q||_1),
            and its layers give the FP outputs for the layer correction. None: `pipe` is its own target.
        dec: the decoupled error correction of the reused feature: "affine" (CacheQuant's per-channel
            F_i ~ a F_c + b), "shift" (a = 1: the per-channel mean drift only, closer to FP on both
            reference pipelines, see benchmarks/results/cache_cpu.md), or None (no DEC). The consumer
            layers' quantization correction is fitted with either, when fp_pipe is given.
        fields: CacheQuantConfig fields (base, branch, blocks); `refresh_steps` skips the DP and keeps
            that schedule (e.g. the one a cache-aware dq.quantize ran with).

    Example:
        >>> calls = [dict(prompt=p, num_inference_steps=20, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)]
        >>> config = calibrate_cachequant(qpipe, calls, interval=5, fp_pipe=fp_pipe)
    """
    if not calls:
        raise DQError("calibrate_cachequant needs at least one calibration call.")
    if dec is not None and dec not in DEC_FITS:
        raise DQError(f"unknown DEC fit {dec!r}; choose one of {sorted(DEC_FITS)} or None (no correction).")
    given = fields.pop("refresh_steps", None)
    probe = CacheQuantConfig(interval=1, **fields)
    quant_traj = _trajectories(pipe, probe, calls)
    fp_traj = quant_traj if fp_pipe is None else _trajectories(fp_pipe, probe, calls)
    lengths = {len(t) for t in quant_traj + fp_traj}
    if len(lengths) != 1:
        raise DQError(f"calibration calls ran different step counts {sorted(lengths)}; use one num_inference_steps.")
    num_steps = lengths.pop()
    cost = sum(l1_cost_matrix(q, f) for q, f in zip(quant_traj, fp_traj)) / len(calls)
    refresh = dp_schedule(cost, interval) if given is None else validate_refresh_steps(given, num_steps)
    config = CacheQuantConfig(interval=interval, refresh_steps=refresh, num_inference_steps=num_steps, **fields)
    if dec is None:
        return config
    channel_dim = 1 if config.base_config(find_denoiser(pipe)).method == "deepcache" else -1
    for step in range(num_steps):
        c = _segment_start(refresh, step)
        if c == step:
            continue
        x = torch.cat([q[c] for q in quant_traj])
        y = torch.cat([f[step] for f in fp_traj])
        config.feature_scale[step], config.feature_shift[step] = DEC_FITS[dec](x, y, channel_dim)
    if fp_pipe is not None:
        _fit_layer_correction(pipe, fp_pipe, calls, config)
    return config


def _trajectories(pipe: DiffusionPipeline, config: CacheQuantConfig, calls: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
    enable_cache(pipe, config)
    try:
        return record_trajectory(pipe, calls)
    finally:
        disable_cache(pipe)


def _fit_layer_correction(pipe: DiffusionPipeline, fp_pipe: DiffusionPipeline, calls: list[dict[str, Any]], config: CacheQuantConfig) -> None:
    """Per output channel of each consumer layer: FP output ~ a * quantized output + b on cached-step inputs."""
    denoiser, fp_modules = find_denoiser(pipe), dict(find_denoiser(fp_pipe).named_modules())
    layers = consumer_layers(denoiser, config)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handle = enable_cache(pipe, config)

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not handle.state().refresh:
                captured[name].append((args[0].detach(), output.detach()))
        return hook

    removers = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for call in calls:
                pipe(**call)
    finally:
        for r in removers:
            r.remove()
        disable_cache(pipe)
    with torch.no_grad():
        for name, pairs in captured.items():
            if not pairs or name not in fp_modules:
                continue
            dim = 1 if isinstance(layers[name], nn.Conv2d) else -1
            y_q = torch.cat([o for _, o in pairs])
            y_fp = torch.cat([fp_modules[name](x.to(next(fp_modules[name].parameters()))) for x, _ in pairs])
            config.layer_scale[name], config.layer_shift[name] = channel_affine_fit(y_q.float(), y_fp.float(), dim)
