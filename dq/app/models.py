"""Loaded and quantized pipelines, built once and reused across requests.

``PipelineCache`` keys pipelines by ``(model, recipe)``. The FP pipeline of a model is loaded once; a quantized
variant is a copy of it whose denoiser alone is deep-copied and quantized, so text encoders and the VAE are
shared between all variants of a model instead of being held once per recipe. Step caches are not part of the
key: they are hooks enabled around a single call (see ``dq.app.generate``), so ``w8a8`` and
``w8a8+deepcache`` run the same quantized weights.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

import dq
from dq import CalibConfig, reference
from dq.errors import DQError
from dq.nn.denoiser import find_denoiser
from dq.pipelines.loading import check_model, load_pipeline
from dq.recipes import load_recipe
from dq.sizes import module_bytes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

Loader = Callable[[str, torch.device, torch.dtype], "DiffusionPipeline"]


@dataclass
class BuiltVariant:
    """A pipeline ready to generate, with what the table reports about how it was made.

    Args:
        pipe: The diffusers pipeline.
        recipe: The recipe applied, or None for the pipeline as loaded.
        weight_bytes: Bytes stored by the denoiser's parameters and buffers.
        build_seconds: Time spent loading or quantizing (calibration included).
        quantized_layers: Number of layers the recipe quantized.
        warm: Whether the pipeline has run once (warm-up before the first timed call).
    """

    pipe: DiffusionPipeline
    recipe: Optional[str]
    weight_bytes: int
    build_seconds: float
    quantized_layers: int = 0
    warm: bool = field(default=False)


def model_defaults(model: str) -> dict[str, Any]:
    """Call arguments a reference pipeline needs (32x32, 9 frames for video); {} for other models."""
    return reference.generation_kwargs(model) if model in reference.names() else {}


def _load(model: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    return load_pipeline(model, device=device, dtype=dtype)


def denoiser_attribute(pipe: DiffusionPipeline) -> str:
    """The name of the pipeline component that is its denoiser (``unet`` or ``transformer``)."""
    denoiser = find_denoiser(pipe)
    for name, component in pipe.components.items():
        if component is denoiser:
            return name
    raise DQError(f"{type(pipe).__name__}: its denoiser is not one of its components; cannot copy it per recipe.")


class PipelineCache:
    """Pipelines by ``(model, recipe)``: the FP pipeline loaded once per model, each recipe quantized once.

    At most ``max_models`` models are kept; asking for another one drops the least recently used model and all
    its variants first (a second model rarely fits next to the first one's variants on one GPU).

    Args:
        device: Where pipelines run.
        dtype: Dtype pipelines are loaded in.
        calib: A dq.CalibConfig for recipes that calibrate on data; None uses each recipe's default set.
        max_models: How many models (each with all its variants) stay loaded.
        loader: ``(model, device, dtype) -> pipeline``; defaults to dq.pipelines.loading.load_pipeline.

    Example:
        >>> cache = PipelineCache("cuda", torch.bfloat16)
        >>> built = cache.get("ref-sd", "w8a8")   # loads ref-sd, copies its UNet, quantizes it
        >>> built is cache.get("ref-sd", "w8a8")  # reused
        True
    """

    def __init__(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        calib: Optional[CalibConfig] = None,
        max_models: int = 1,
        loader: Loader = _load,
    ) -> None:
        if max_models < 1:
            raise DQError(f"max_models must be at least 1, got {max_models}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.calib = calib
        self.max_models = max_models
        self.loader = loader
        self._models: OrderedDict[str, dict[Optional[str], BuiltVariant]] = OrderedDict()
        self._lock = threading.RLock()

    def keys(self) -> list[tuple[str, Optional[str]]]:
        """The ``(model, recipe)`` pairs currently built, least recently used model first."""
        with self._lock:
            return [(model, recipe) for model, variants in self._models.items() for recipe in variants]

    def get(self, model: str, recipe: Optional[str] = None) -> BuiltVariant:
        """The pipeline of ``model`` quantized with ``recipe`` (None: as loaded), building it on first use.

        Raises:
            DQError: the model cannot be loaded, the recipe does not exist or does not apply to it.
        """
        with self._lock:
            variants = self._variants_of(model)
            if recipe not in variants:
                variants[recipe] = self._quantize(model, variants[None], recipe)
            return variants[recipe]

    def evict(self, model: Optional[str] = None, keep_fp: bool = False) -> None:
        """Drop the variants of ``model`` (all models when None); ``keep_fp`` keeps each FP pipeline."""
        with self._lock:
            for name in [model] if model is not None else list(self._models):
                variants = self._models.get(name)
                if variants is None:
                    continue
                if keep_fp:
                    for recipe in [r for r in variants if r is not None]:
                        del variants[recipe]
                else:
                    del self._models[name]
            _release_memory(self.device)

    def _variants_of(self, model: str) -> dict[Optional[str], BuiltVariant]:
        """The variants dict of ``model``, loading its FP pipeline (and evicting older models) when new."""
        model = model.strip()
        if not model:
            raise DQError("no model given; type a reference name (ref-sd), a local diffusers directory or a hub id.")
        if model in self._models:
            self._models.move_to_end(model)
            return self._models[model]
        check_model(model)  # a typo must not unload the models that are working
        while len(self._models) >= self.max_models:
            dropped, _ = self._models.popitem(last=False)
            logger.info("dq app: unloading %s to make room for %s", dropped, model)
            _release_memory(self.device)
        start = time.perf_counter()
        pipe = self.loader(model, self.device, self.dtype)
        # Sampling progress bars are what gr.Progress(track_tqdm=True) shows while a variant generates.
        pipe.set_progress_bar_config(disable=False, leave=False)
        built = BuiltVariant(pipe, None, module_bytes(find_denoiser(pipe)), time.perf_counter() - start)
        self._models[model] = {None: built}
        return self._models[model]

    def _quantize(self, model: str, base: BuiltVariant, recipe: str) -> BuiltVariant:
        """A copy of the FP pipeline sharing every component but the denoiser (and scheduler), quantized."""
        start = time.perf_counter()
        pipe = _with_own_denoiser(base.pipe)
        logger.info("dq app: quantizing %s with %s", model, recipe)
        report = dq.quantize(pipe, recipe, calib=self._calib_for(model, pipe, recipe))
        return BuiltVariant(
            pipe, recipe, module_bytes(find_denoiser(pipe)), time.perf_counter() - start, len(report.quantized)
        )

    def _calib_for(self, model: str, pipe: DiffusionPipeline, recipe: str) -> Optional[CalibConfig]:
        """The calibration config: ``self.calib``, plus the call arguments a reference pipeline needs.

        Calibration runs the pipeline; a reference pipeline run at the stock defaults (PixArt's resolution
        binning, Wan's 480x832x81) fails or takes hours, so its 32x32 (9-frame) arguments are added, and without
        a configured ``calib`` it calibrates on the reference domain's train prompts.
        """
        defaults = model_defaults(model)
        if not defaults or not load_recipe(recipe).needs_data:
            return self.calib
        calib = self.calib
        if calib is None:
            logger.warning(
                "dq app: calibrating %s for %s on %s train prompts with dq.CalibConfig defaults (uniform timestep "
                "sampling); start the app with --calib-* flags to choose.", recipe, model, model,
            )
            calib = CalibConfig(prompts=reference.prompts("train", video=reference.is_video(model)))
        if "clean_caption" in inspect.signature(pipe.__call__).parameters:
            defaults["clean_caption"] = False  # as in generation: needs bs4 + ftfy, else warns on every call
        return dataclasses.replace(calib, pipeline_kwargs={**defaults, **calib.pipeline_kwargs})


def _with_own_denoiser(fp: DiffusionPipeline) -> DiffusionPipeline:
    """A shallow copy of ``fp`` with a deep copy of its denoiser and scheduler; other components are shared.

    Not ``DiffusionPipeline.from_pipe``: it ends with ``.to(dtype)`` (float32 by default), which would recast
    the shared components and undo modules kept in float32 by ``from_pretrained``.
    """
    name = denoiser_attribute(fp)
    pipe = copy.copy(fp)  # a new __dict__; assigning components below updates only the copy's config
    setattr(pipe, name, copy.deepcopy(getattr(fp, name)))
    if getattr(fp, "scheduler", None) is not None:
        pipe.scheduler = copy.deepcopy(fp.scheduler)  # schedulers keep per-call state (timesteps, step index)
    return pipe


def _release_memory(device: torch.device) -> None:
    """Return freed pipelines' memory now rather than at the next collection."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
