"""Calibration data from a diffusers pipeline: run the FP pipeline on prompts and keep the denoiser's inputs.

This is the adapter that decides where the core's `CalibData` comes from. Three timestep samplings
(`dq.calib.Sampling`; by default the one the recipe's method follows):

- all: every executed step.
- uniform (Q-Diffusion): `calib_steps` steps, every k-th: range(0, steps, steps // calib_steps).
- ndtc (PTQ4DM normally-distributed timestep calibration): each sample draws one timestep
  t = clip(N(mu * T, sigma * T), 0, T - 1) and keeps the inputs of the executed step whose timestep is
  nearest to t (the label is that step's index and timestep, not the drawn t).

With a step cache enabled on the pipeline (cache-aware calibration), the FP run is cached as it will be at
inference, and each sample also keeps that step's cache state, which the replay pins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dq import reference
from dq.cache import CalibrationReplay, calibration_replay
from dq.calib.base import Sampling
from dq.calib.data import CalibData, CalibSample, map_tensors
from dq.calib.state import quant_state
from dq.calib.timestep import timestep_of
from dq.errors import DQError
from dq.io import atomic_file, read_prompt_file
from dq.nn.denoiser import find_denoiser
from dq.sizes import nested_bytes, nested_tensors

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from dq.recipes import Recipe

logger = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).parent / "prompts"
STORE_DTYPE = torch.float16
STORE_VERSION = 2  # bumped when the stored samples change layout (v2: cache state beside the inputs)


@dataclass
class CalibConfig:
    """How calibration data is collected from the FP pipeline.

    Args:
        prompts: a list of prompts, a text file (one prompt per line), a bundled set name
            ("default"), or "reference" (the reference domain's train prompts).
        steps: num_inference_steps of the FP run.
        samples: number of prompts (images) run; prompts are cycled when fewer are given.
        sampling: "all", "uniform" (Q-Diffusion) or "ndtc" (PTQ4DM); None: the one the recipe's method follows.
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
    sampling: Sampling | str | None = None
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
        allowed = [m.value for m in Sampling]
        if self.sampling is not None:
            if self.sampling not in allowed:
                raise DQError(f"CalibConfig.sampling is {self.sampling!r}; allowed: {', '.join(allowed)} (or None: the method's).")
            self.sampling = Sampling(self.sampling)
        for name in ("steps", "samples", "batch_size", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DQError(f"CalibConfig.{name} must be a positive integer, got {value!r}.")
        if self.calib_steps is not None and not 1 <= self.calib_steps <= self.steps:
            raise DQError(f"CalibConfig.calib_steps must lie in [1, steps={self.steps}], got {self.calib_steps}.")
        if self.ndtc_sigma <= 0:
            raise DQError(f"CalibConfig.ndtc_sigma must be positive, got {self.ndtc_sigma}.")


@dataclass
class _Call:
    """One recorded denoiser call: its timestep, inputs and (with a step cache) the cache state it ran in."""

    timestep: float
    args: tuple
    kwargs: dict
    cache_state: dict[str, Any] | None = None


def _slice_rows(obj: Any, batch: int, rows: torch.Tensor) -> Any:
    """The rows of one prompt; a 0-d timestep becomes one value per row so samples can be batched."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.reshape(1).expand(len(rows))
        elif t.shape[0] == batch:
            t = t[rows.to(t.device)]
        t = t.detach().cpu()
        return t.to(STORE_DTYPE) if t.is_floating_point() else t.clone()

    return map_tensors(obj, fn)


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
            prompts = read_prompt_file(PROMPT_DIR / f"{p}.txt")
        elif Path(p).is_file():
            prompts = read_prompt_file(p)
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


# -- collection ------------------------------------------------------------------------------------
def _fingerprint(denoiser: nn.Module) -> str:
    """A cheap identity of the model weights (class, config and per-parameter sums)."""
    h = hashlib.sha256(type(denoiser).__name__.encode())
    h.update(json.dumps(dict(getattr(denoiser, "config", {})), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def cache_key(config: CalibConfig, sampling: Sampling, prompts: list[str], denoiser: nn.Module, replay: CalibrationReplay | None) -> str:
    """Hash of every setting that changes the collected data, of the model, and of an enabled step cache."""
    d = asdict(config)
    d["version"] = STORE_VERSION
    d["sampling"] = sampling.value
    d["step_cache"] = None if replay is None else replay.handle.config.to_json()
    d.pop("cache_dir")
    d.pop("max_bytes")
    d["pipeline_kwargs"] = {k: (f"tensor{tuple(v.shape)}:{float(v.double().sum()):.8e}" if isinstance(v, torch.Tensor) else v)
                            for k, v in config.pipeline_kwargs.items()}
    d["prompts"] = prompts
    d["model"] = _fingerprint(denoiser)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _check_finite(sample_obj: Any, step: int, timestep: float, prompt: int) -> None:
    for name, t in nested_tensors(sample_obj):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DQError(
                f"the FP pipeline produced non-finite values in denoiser input {name!r} at step {step} "
                f"(timestep {timestep:g}) for calibration prompt {prompt}; the float model diverges on this "
                "prompt/guidance. Check the model in float32, lower guidance_scale, or drop the prompt."
            )


def collect(pipe: DiffusionPipeline, config: CalibConfig, sampling: Sampling | None = None) -> CalibData:
    """Run the FP pipeline on the config's prompts and capture the denoiser inputs at the chosen steps.

    sampling: the config's, else this one (the method's), else uniform. With a step cache enabled on the
    pipeline (dq.enable_cache), each sample keeps the cache state of its step and replays in it.

    Example:
        >>> data = collect(pipe, CalibConfig(prompts=["a red circle"], steps=10, samples=4))
        >>> len(data), data.steps
    """
    if pipe is None or isinstance(pipe, nn.Module):
        raise DQError("calibration needs the pipeline that generates images; call dq.quantize(pipe, ...) on the pipeline.")
    sampling = config.sampling or sampling or Sampling.UNIFORM
    denoiser = find_denoiser(pipe)
    replay = calibration_replay(pipe)
    prompts = resolve_prompts(config)
    path = None
    if config.cache_dir:
        path = Path(config.cache_dir) / f"calib-{cache_key(config, sampling, prompts, denoiser, replay)}.pt"
        if path.is_file():
            logger.info("dq: loading calibration data from %s", path)
            return load_data(path, replay)
    data = _run(pipe, denoiser, prompts, config, sampling, replay)
    if path is not None:
        save_data(data, path)
    return data


def calibration_data(pipe: DiffusionPipeline, recipe: Recipe, calib: CalibConfig | CalibData | None) -> CalibData:
    """The data a recipe's method calibrates on: given, or collected from the pipeline (the bundled set by default)."""
    if isinstance(calib, CalibData):
        return calib
    if calib is None:
        calib = default_calib(recipe.name, pipe)
    if not isinstance(calib, CalibConfig):
        raise DQError(f"calib must be a dq.CalibConfig (or collected dq.calib.CalibData), got {type(calib).__name__}.")
    method_sampling = recipe.calibration.sampling
    if calib.sampling is not None and calib.sampling is not method_sampling:
        logger.info("dq: recipe %r follows %r timestep sampling; using the config's %r", recipe.name, method_sampling.value, calib.sampling.value)
    return collect(pipe, calib, method_sampling)


def default_calib(recipe_name: str, pipe: DiffusionPipeline) -> CalibConfig:
    """The calibration set used when a data-driven recipe gets calib=None (logged at WARNING): the reference
    domain's training prompts for a reference pipeline, the bundled general prompt set otherwise."""
    prompts = "reference" if reference.name_of(pipe) else "default"
    logger.warning(
        "dq: recipe %r calibrates on data and got calib=None; using the bundled prompt set %r "
        "(pass calib=dq.CalibConfig(...) to choose).", recipe_name, prompts,
    )
    return CalibConfig(prompts=prompts)


def _run(pipe: DiffusionPipeline, denoiser: nn.Module, prompts: list[str], config: CalibConfig, sampling: Sampling,
         replay: CalibrationReplay | None) -> CalibData:
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(_Call(timestep_of(module, args, kwargs), args, dict(kwargs)))

    def after_call(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # The cache decided (and used) this step's state inside the call; store it with the call's inputs.
        calls[-1].cache_state = replay.capture()

    train_T = int(getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))
    gen = torch.Generator().manual_seed(config.seed)
    draws = ndtc_draw(len(prompts), train_T, config.ndtc_mu, config.ndtc_sigma, gen) if sampling is Sampling.NDTC else None
    keep_steps = set(uniform_steps(config.steps, config.calib_steps or max(config.steps // 2, 1))) if sampling is Sampling.UNIFORM else None

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
                schedule = _schedule(calls)
                for call in calls:
                    step = nearest_step(schedule, call.timestep)
                    bsz = _batch_size(call.args, call.kwargs)
                    if bsz % len(batch):
                        raise DQError(f"the denoiser batch ({bsz}) is not a multiple of the prompt batch ({len(batch)}); cannot split it per prompt.")
                    for i in range(len(batch)):
                        prompt = start + i
                        if keep_steps is not None and step not in keep_steps:
                            continue
                        if draws is not None and step != nearest_step(schedule, float(draws[prompt])):
                            continue
                        rows = torch.arange(i, bsz, len(batch))
                        s_args, s_kwargs = _slice_rows(call.args, bsz, rows), _slice_rows(call.kwargs, bsz, rows)
                        state = None if call.cache_state is None else _slice_rows(call.cache_state, bsz, rows)
                        _check_finite((s_args, s_kwargs), step, schedule[step], prompt)
                        total += nested_bytes((s_args, s_kwargs, state))
                        if total > config.max_bytes:
                            raise DQError(
                                f"calibration data exceeds max_bytes={config.max_bytes} ({total / 2**20:.1f} MiB so far, "
                                f"{len(samples)} samples); lower CalibConfig.samples, steps or calib_steps "
                                "(or use sampling='uniform'/'ndtc'), or raise max_bytes."
                            )
                        samples.append(CalibSample(step, schedule[step], prompt, s_args, s_kwargs, len(rows), state))
    finally:
        for h in handles:
            h.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = progress_cfg
    if not samples:
        raise DQError("calibration collected no samples; check CalibConfig.steps / calib_steps / sampling.")
    samples.sort(key=lambda s: (s.prompt, s.step))
    return CalibData(samples, schedule, [] if draws is None else draws.tolist(), replay)


def _call_kwargs(pipe: DiffusionPipeline, config: CalibConfig, batch: list[str], start: int, device: torch.device) -> dict:
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


def _schedule(calls: list[_Call]) -> list[float]:
    """Timesteps of the executed steps, as the denoiser received them (FLUX divides the scheduler's by 1000),
    in call order; a step that calls the denoiser twice (one call per CFG branch) counts once."""
    seen: list[float] = []
    for call in calls:
        if not seen or seen[-1] != call.timestep:
            seen.append(call.timestep)
    return seen


def _batch_size(args: tuple, kwargs: dict) -> int:
    for _, t in nested_tensors((args, kwargs)):
        if t.dim() >= 3:  # the latents (or hidden states) are the first tensor of rank >= 3
            return int(t.shape[0])
    raise DQError("found no batched tensor input of the denoiser to calibrate on.")


def save_data(data: CalibData, path: Path) -> None:
    """Store collected data (atomically); `load_data` reads it back."""
    blob = {"samples": [asdict(s) for s in data.samples], "schedule": data.schedule, "drawn": data.drawn}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)


def load_data(path: Path, replay: CalibrationReplay | None = None) -> CalibData:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    for s in blob["samples"]:
        s.pop("float_kwargs", None)  # always None in files written before stream_kwargs replaced it
    return CalibData([CalibSample(**s) for s in blob["samples"]], blob["schedule"], blob["drawn"], replay)


__all__ = ["CalibConfig", "calibration_data", "collect", "default_calib", "load_data", "ndtc_draw", "nearest_step", "resolve_prompts", "save_data", "uniform_steps"]
