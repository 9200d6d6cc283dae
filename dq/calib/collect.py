"""Calibration data: run the FP pipeline on prompts and keep the denoiser's inputs at chosen steps.

Three timestep samplings (see `CalibConfig.sampling`):

- "all": every executed step.
- "uniform" (Q-Diffusion): `calib_steps` steps, every k-th: range(0, steps, steps // calib_steps).
- "ndtc" (PTQ4DM normally-distributed timestep calibration): each sample draws one timestep
  t = clip(N(mu * T, sigma * T), 0, T - 1) and keeps the inputs of the executed step whose timestep is
  nearest to t (the label is that step's index and timestep, not the drawn t).

A stored sample is one prompt at one step: every positional/keyword tensor the pipeline passed to the
denoiser, sliced to that prompt's rows (both CFG branches), in float16 on CPU (or cached on disk).

With a step cache enabled on the pipeline (cache-aware calibration), the FP run is cached as it will be at
inference, and each sample also keeps that step's cache state (refresh or cached, and the reused feature)
in its kwargs, so replaying it runs the denoiser exactly as the cache does on that step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dq import reference
from dq.calib.state import quant_state
from dq.calib.timestep import timestep_of
from dq.errors import DQError

logger = logging.getLogger(__name__)

SAMPLINGS = ("all", "uniform", "ndtc")
PROMPT_DIR = Path(__file__).parent / "prompts"
STORE_DTYPE = torch.float16


@dataclass
class CalibConfig:
    """How calibration data is collected from the FP pipeline.

    Args:
        prompts: a list of prompts, a text file (one prompt per line), a bundled set name
            ("default"), or "reference" (the reference domain's train prompts).
        steps: num_inference_steps of the FP run.
        samples: number of prompts (images) run; prompts are cycled when fewer are given.
        sampling: "all", "uniform" (Q-Diffusion) or "ndtc" (PTQ4DM).
        calib_steps: steps kept by "uniform" (Q-Diffusion's cali_st); None = steps // 2.
        ndtc_mu, ndtc_sigma: NDTC's normal distribution, as fractions of the train timesteps T.
        guidance_scale: CFG scale of the FP run (None = the pipeline's default).
        seed: seed of the initial noise (and of NDTC's draws).
        batch_size: prompts per pipeline call.
        cache_dir: when set, the collected data is stored there keyed by a hash of these settings
            and the model, and a re-run with the same settings loads it.
        max_bytes: cap on the stored data; exceeding it is an error naming the setting to lower.
        pipeline_kwargs: extra arguments of the pipeline call (height, width, or prompt_embeds for
            pipelines without a text encoder: the prompts then only count the samples).

    Example:
        >>> calib = dq.CalibConfig(prompts="reference", steps=20, samples=64, sampling="uniform")
        >>> dq.quantize(pipe, "w4a8-qdiffusion", calib=calib)
    """

    prompts: list[str] | str = "reference"
    steps: int = 20
    samples: int = 64
    sampling: str = "uniform"
    calib_steps: int | None = None
    ndtc_mu: float = 0.4
    ndtc_sigma: float = 0.4
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 8
    cache_dir: str | None = None
    max_bytes: int = 4 * 2**30
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise DQError(f"CalibConfig.sampling is {self.sampling!r}; allowed: {', '.join(SAMPLINGS)}.")
        for name in ("steps", "samples", "batch_size", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DQError(f"CalibConfig.{name} must be a positive integer, got {value!r}.")
        if self.calib_steps is not None and not 1 <= self.calib_steps <= self.steps:
            raise DQError(f"CalibConfig.calib_steps must lie in [1, steps={self.steps}], got {self.calib_steps}.")
        if self.ndtc_sigma <= 0:
            raise DQError(f"CalibConfig.ndtc_sigma must be positive, got {self.ndtc_sigma}.")


@dataclass
class CalibSample:
    """The denoiser inputs of one prompt at one step (all CFG rows), stored in float16 on CPU."""

    step: int
    timestep: float
    prompt: int
    args: tuple
    kwargs: dict
    rows: int
    cached: bool = False  # a cached step of an enabled step cache (replays with the reused feature)


@dataclass
class CalibData:
    """Collected calibration samples and the schedule they came from."""

    samples: list[CalibSample]
    schedule: list[float]  # timestep of every executed step, in order
    drawn: list[float] = field(default_factory=list)  # NDTC: the drawn t of each prompt

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def steps(self) -> list[int]:
        """Distinct step indices present, ascending."""
        return sorted({s.step for s in self.samples})

    @property
    def nbytes(self) -> int:
        return sum(_nbytes((s.args, s.kwargs)) for s in self.samples)

    def rows(self) -> int:
        return sum(s.rows for s in self.samples)

    def batches(self, batch_size: int, by_step: bool = False, max_samples: int | None = None) -> Iterator[tuple[list[CalibSample], tuple, dict]]:
        """Collated batches (samples, args, kwargs) of up to `batch_size` samples (float16 on CPU).

        by_step: every batch holds one step only (per-timestep statistics, and quantizers whose
        timestep group must be one per call). Cached steps of a step cache are always batched per
        step, apart from refresh steps: one denoiser call replays one cache state.
        """
        pool = self.samples if max_samples is None else _spread(self.samples, max_samples)
        keyed: dict[tuple[int, bool], list[CalibSample]] = {}
        for s in pool:
            keyed.setdefault((s.step if by_step or s.cached else -1, s.cached), []).append(s)
        groups = [keyed[k] for k in sorted(keyed)]
        for group in groups:
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                yield chunk, _collate([s.args for s in chunk], [s.rows for s in chunk]), _collate(
                    [s.kwargs for s in chunk], [s.rows for s in chunk]
                )


def _spread(samples: list[CalibSample], n: int) -> list[CalibSample]:
    """n samples spread evenly over the list (which is ordered by prompt, then step)."""
    if n >= len(samples):
        return samples
    idx = torch.linspace(0, len(samples) - 1, n).round().long().tolist()
    return [samples[i] for i in idx]


# -- tensors in nested args ------------------------------------------------------------------------
def _map(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _tensors(o, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(obj))


def _collate(items: list[Any], rows: list[int]) -> Any:
    """Concatenate per-sample structures along rows; tensors without a row dimension are shared."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and first.shape[0] == rows[0]:
            return torch.cat(items, dim=0)
        return first
    if isinstance(first, tuple):
        return tuple(_collate([it[i] for it in items], rows) for i in range(len(first)))
    if isinstance(first, list):
        return [_collate([it[i] for it in items], rows) for i in range(len(first))]
    if isinstance(first, dict):
        return {k: _collate([it[k] for it in items], rows) for k in first}
    return first


def to_device(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move stored tensors to `device`, floating ones to `dtype`."""
    return _map(obj, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))


def _slice_rows(obj: Any, batch: int, rows: torch.Tensor) -> Any:
    """The rows of one prompt; a 0-d timestep becomes one value per row so samples can be batched."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.reshape(1).expand(len(rows))
        elif t.shape[0] == batch:
            t = t[rows.to(t.device)]
        t = t.detach().cpu()
        return t.to(STORE_DTYPE) if t.is_floating_point() else t.clone()

    return _map(obj, fn)


# -- timestep sampling -----------------------------------------------------------------------------
def uniform_steps(steps: int, calib_steps: int) -> list[int]:
    """Q-Diffusion's step subset: range(0, steps, steps // calib_steps)."""
    return list(range(0, steps, max(steps // calib_steps, 1)))


def ndtc_draw(n: int, train_timesteps: int, mu: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """PTQ4DM's NDTC draws: t = int(N(mu, sigma) * T) clipped to [0, T - 1] (n values, float)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64) * sigma + mu
    return torch.clamp((z * train_timesteps).floor(), 0, train_timesteps - 1)


def nearest_step(schedule: list[float], t: float) -> int:
    """Index of the executed step whose timestep is nearest to t (the first on ties)."""
    return min(range(len(schedule)), key=lambda i: (abs(schedule[i] - t), i))


# -- prompts ---------------------------------------------------------------------------------------
def bundled_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def resolve_prompts(config: CalibConfig) -> list[str]:
    """The `samples` prompts of the config (cycled), or a DQError when there are none."""
    p = config.prompts
    if isinstance(p, str):
        if p == "reference":
            prompts = list(reference.prompts("train"))
        elif (PROMPT_DIR / f"{p}.txt").is_file():
            prompts = _read_lines(PROMPT_DIR / f"{p}.txt")
        elif Path(p).is_file():
            prompts = _read_lines(Path(p))
        else:
            raise DQError(
                f"CalibConfig.prompts={p!r} is neither a bundled prompt set ({', '.join(bundled_prompt_sets())}, "
                "reference) nor an existing file; pass one of those or a list of prompts."
            )
    else:
        prompts = [str(x) for x in p]
    if not prompts:
        raise DQError("the calibration set has zero prompts; pass at least one prompt (or prompts='default').")
    return [prompts[i % len(prompts)] for i in range(config.samples)]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


# -- collection ------------------------------------------------------------------------------------
def _fingerprint(denoiser: nn.Module) -> str:
    """A cheap identity of the model weights (class, config and per-parameter sums)."""
    h = hashlib.sha256(type(denoiser).__name__.encode())
    h.update(json.dumps(dict(getattr(denoiser, "config", {})), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def cache_key(config: CalibConfig, prompts: list[str], denoiser: nn.Module, replay: Any = None) -> str:
    """Hash of every setting that changes the collected data, of the model, and of an enabled step cache."""
    d = asdict(config)
    d["step_cache"] = None if replay is None else replay.handle.config.to_json()
    d.pop("cache_dir")
    d.pop("max_bytes")
    d["pipeline_kwargs"] = {k: (f"tensor{tuple(v.shape)}:{float(v.double().sum()):.8e}" if isinstance(v, torch.Tensor) else v)
                            for k, v in config.pipeline_kwargs.items()}
    d["prompts"] = prompts
    d["model"] = _fingerprint(denoiser)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _check_finite(sample_obj: Any, step: int, timestep: float, prompt: int) -> None:
    for name, t in _tensors(sample_obj):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DQError(
                f"the FP pipeline produced non-finite values in denoiser input {name!r} at step {step} "
                f"(timestep {timestep:g}) for calibration prompt {prompt}; the float model diverges on this "
                "prompt/guidance. Check the model in float32, lower guidance_scale, or drop the prompt."
            )


def collect(pipe: Any, config: CalibConfig, replay: Any = None) -> CalibData:
    """Run the FP pipeline on the config's prompts and capture the denoiser inputs at the chosen steps.

    Quantized layers already swapped into the denoiser run in float (their quantizers bypassed).
    `replay` (dq.cache.calibration_replay(pipe)) stores each step's cache state with its samples.

    Example:
        >>> data = collect(pipe, CalibConfig(prompts=["a red circle"], steps=10, samples=4))
        >>> len(data), data.steps
    """
    from dq.pipelines.walker import find_denoiser

    if pipe is None:
        raise DQError("calibration needs the pipeline that generates images; call dq.quantize(pipe, ...) on the pipeline.")
    denoiser = find_denoiser(pipe)
    prompts = resolve_prompts(config)
    path = None
    if config.cache_dir:
        path = Path(config.cache_dir) / f"calib-{cache_key(config, prompts, denoiser, replay)}.pt"
        if path.is_file():
            logger.info("dq: loading calibration data from %s", path)
            return _load(path)
    data = _run(pipe, denoiser, prompts, config, replay)
    if path is not None:
        _save(data, path)
    return data


def _run(pipe: Any, denoiser: nn.Module, prompts: list[str], config: CalibConfig, replay: Any) -> CalibData:
    calls: list[tuple[float, tuple, dict]] = []

    def hook(module, args, kwargs):
        t = timestep_of(module, args, kwargs)
        calls.append((t, args, dict(kwargs)))

    def after_call(module, args, kwargs, output):
        # The cache decided (and used) this step's state inside the call; store it with the call's inputs.
        calls[-1][2][replay.kwarg] = replay.capture()

    train_T = int(getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))
    gen = torch.Generator().manual_seed(config.seed)
    draws = ndtc_draw(len(prompts), train_T, config.ndtc_mu, config.ndtc_sigma, gen) if config.sampling == "ndtc" else None
    keep_steps = set(uniform_steps(config.steps, config.calib_steps or max(config.steps // 2, 1))) if config.sampling == "uniform" else None

    samples: list[CalibSample] = []
    schedule: list[float] = []
    total = 0
    device = next(denoiser.parameters()).device
    handles = [denoiser.register_forward_pre_hook(hook, with_kwargs=True)]
    if replay is not None:
        handles.append(denoiser.register_forward_hook(after_call, with_kwargs=True))
    progress_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        with quant_state(denoiser, weights=False, acts=False), torch.no_grad():
            bar = tqdm(range(0, len(prompts), config.batch_size), desc="dq: collecting calibration data", leave=False)
            for start in bar:
                batch = prompts[start : start + config.batch_size]
                calls.clear()
                pipe(**_call_kwargs(pipe, config, batch, start, device))
                schedule = _schedule(pipe, calls)
                for t, args, kwargs in calls:
                    step = nearest_step(schedule, t)
                    bsz = _batch_size(args, kwargs)
                    if bsz % len(batch):
                        raise DQError(f"the denoiser batch ({bsz}) is not a multiple of the prompt batch ({len(batch)}); cannot split it per prompt.")
                    for i in range(len(batch)):
                        prompt = start + i
                        if keep_steps is not None and step not in keep_steps:
                            continue
                        if draws is not None and step != nearest_step(schedule, float(draws[prompt])):
                            continue
                        rows = torch.arange(i, bsz, len(batch))
                        s_args, s_kwargs = _slice_rows(args, bsz, rows), _slice_rows(kwargs, bsz, rows)
                        _check_finite((s_args, s_kwargs), step, schedule[step], prompt)
                        total += _nbytes((s_args, s_kwargs))
                        if total > config.max_bytes:
                            raise DQError(
                                f"calibration data exceeds max_bytes={config.max_bytes} ({total / 2**20:.1f} MiB so far, "
                                f"{len(samples)} samples); lower CalibConfig.samples, steps or calib_steps "
                                "(or use sampling='uniform'/'ndtc'), or raise max_bytes."
                            )
                        cached = replay is not None and not kwargs[replay.kwarg]["refresh"]
                        samples.append(CalibSample(step, schedule[step], prompt, s_args, s_kwargs, len(rows), cached))
    finally:
        for h in handles:
            h.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = progress_cfg
    if not samples:
        raise DQError("calibration collected no samples; check CalibConfig.steps / calib_steps / sampling.")
    samples.sort(key=lambda s: (s.prompt, s.step))
    return CalibData(samples, schedule, [] if draws is None else draws.tolist())


def _call_kwargs(pipe: Any, config: CalibConfig, batch: list[str], start: int, device: torch.device) -> dict:
    # A reference pipeline runs at its own size (the stock defaults target 512px+ checkpoints).
    name = reference.name_of(pipe)
    kw = {**(reference.generation_kwargs(name) if name else {}), **config.pipeline_kwargs}
    kw.update(num_inference_steps=config.steps, output_type="latent")
    kw["generator"] = torch.Generator(device="cpu").manual_seed(config.seed + start)
    if config.guidance_scale is not None:
        kw["guidance_scale"] = config.guidance_scale
    if "prompt_embeds" in kw:
        kw["num_images_per_prompt"] = len(batch)
    else:
        kw["prompt"] = batch
    return kw


def _schedule(pipe: Any, calls: list[tuple[float, tuple, dict]]) -> list[float]:
    """Timesteps of the executed steps: the scheduler's list when it matches the calls, else call order."""
    ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    seen = []
    for t, _, _ in calls:
        if not seen or seen[-1] != t:
            seen.append(t)
    if ts is not None and len(ts) == len(seen):
        return [float(t) for t in ts]
    return seen


def _batch_size(args: tuple, kwargs: dict) -> int:
    for _, t in _tensors((args, kwargs)):
        if t.dim() >= 3:  # the latents (or hidden states) are the first tensor of rank >= 3
            return int(t.shape[0])
    raise DQError("found no batched tensor input of the denoiser to calibrate on.")


def _save(data: CalibData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"samples": [asdict(s) for s in data.samples], "schedule": data.schedule, "drawn": data.drawn}, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> CalibData:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return CalibData([CalibSample(**s) for s in blob["samples"]], blob["schedule"], blob["drawn"])


def default_calib(recipe_name: str, pipe: Any, sampling: str = "uniform") -> CalibConfig:
    """The calibration set used when a data-driven recipe gets calib=None (logged at WARNING): the reference
    domain's training prompts for a reference pipeline, the bundled general prompt set otherwise."""
    prompts = "reference" if reference.name_of(pipe) else "default"
    logger.warning(
        "dq: recipe %r calibrates on data and got calib=None; using the bundled prompt set %r "
        "(pass calib=dq.CalibConfig(...) to choose).", recipe_name, prompts,
    )
    return CalibConfig(prompts=prompts, sampling=sampling)


def calibration_data(context: Any, recipe: Any, sampling: str = "uniform") -> CalibData:
    """Collect (or load) the data for a calibrator: context.calib, or the bundled default set."""
    config = context.calib if context.calib is not None else default_calib(recipe.name, context.pipeline, sampling)
    if not isinstance(config, CalibConfig):
        raise DQError(f"calib must be a dq.CalibConfig, got {type(config).__name__}.")
    if config.sampling != sampling:
        logger.info("dq: recipe %r follows %r timestep sampling; using the config's %r", recipe.name, sampling, config.sampling)
    return collect(context.pipeline, config, context.cache_replay)


__all__ = ["CalibConfig", "CalibData", "CalibSample", "calibration_data", "collect", "ndtc_draw", "nearest_step", "to_device", "uniform_steps"]
