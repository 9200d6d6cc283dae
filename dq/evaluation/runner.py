"""``evaluate``: check the input, generate what is missing, score, and write the report (rank 0 only).

Under ``accelerate launch`` every process runs this same function: batches of prompts are shared with
``PartialState.split_between_processes``, metrics are gathered through torchmetrics' sync, and only the main
process writes config.json, results.json and the report.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import diffusers
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from dq import reference
from dq.errors import DQError
from dq.evaluation.eval_config import EvalConfig, generation_record
from dq.evaluation.generation import (
    Item,
    VariantBuilder,
    call_arguments,
    generate_variant,
    make_batches,
    make_items,
    read_perf,
    summarize_perf,
)
from dq.evaluation.prompts import read_prompts
from dq.evaluation.report import add_ratios, markdown_report, markdown_table, write_grid, write_plot
from dq.evaluation.rundir import RunDir, read_json, write_json
from dq.evaluation.scoring import MetricSet, build_metrics, real_images, score_variants
from dq.evaluation.variants import Variant, parse_variants
from dq.io import atomic_file
from dq.pipelines.loading import check_model, load_pipeline

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run (or resume) an evaluation and return its results (the content of RUN/results.json).

    Args:
        cfg: What to evaluate and where to write it.

    Example:
        >>> from dq.evaluation import EvalConfig, evaluate
        >>> results = evaluate(EvalConfig(model="ref-sd", out="runs/sd", variants=["fp", "w8a8"], n=8, steps=20))
        >>> results["variants"]["w8a8"]["metrics"]["psnr"]["value"]
    """
    state = process_state()
    device = state.device
    # Everything a user can get wrong is checked here, on every process, before any model is loaded.
    model_id = check_model(cfg.model)
    variants = parse_variants(cfg.variants)
    reference_domain = model_id in reference.names()
    _refuse_requantizing(model_id, variants)
    video = _is_video_model(model_id)
    prompts = read_prompts(cfg.prompts, cfg.n, video=video and reference_domain)
    dtype_name = cfg.dtype or ("float16" if device.type == "cuda" else "float32")
    metric_set = build_metrics(cfg.scoring, reference_domain, device)
    generation = generation_record(cfg, model_id, variants, prompts, dtype_name)
    scoring_record = {"requested": cfg.scoring.metrics, "settings": metric_set.settings, "skipped": metric_set.skipped}
    run = RunDir(cfg.out)
    if not cfg.overwrite:
        run.check(generation)  # on every process, so all of them stop alike
    state.wait_for_everyone()
    if state.is_main_process:
        resumed = run.prepare(generation, scoring_record, cfg.overwrite)
        if resumed:
            logger.info("dq eval: resuming %s", run.root)
    state.wait_for_everyone()

    items = make_items(prompts, cfg.seed)
    batches = list(enumerate(make_batches(items, cfg.batch_size)))
    with state.split_between_processes(batches) as shard:
        my_batches = list(shard)
    overrides = {**(reference.generation_kwargs(model_id) if reference_domain else {}), **{
        k: v for k, v in (("height", cfg.height), ("width", cfg.width), ("num_frames", cfg.num_frames)) if v is not None
    }}

    def load() -> DiffusionPipeline:
        return load_pipeline(model_id, device=device, dtype=_DTYPES[dtype_name])

    def call_kwargs_for(pipe: DiffusionPipeline) -> dict[str, Any]:
        return call_arguments(pipe, cfg.steps, cfg.guidance, overrides)

    builder = VariantBuilder(load)
    for variant in variants:
        generate_variant(variant, my_batches, run, builder, call_kwargs_for, video, device, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        _ensure_variant_info(run, variants, builder)
    state.wait_for_everyone()

    real = real_images(prompts, cfg.seed) if reference_domain and metric_set.real_fid is not None else None
    scores = score_variants(variants, my_batches, run, metric_set, video, real, state.is_main_process)
    results = _assemble(run, generation, variants, scores, metric_set, str(device))
    if state.is_main_process:
        _write_outputs(run, results, items, video)
    state.wait_for_everyone()
    return results


def process_state() -> PartialState:
    """accelerate's ``PartialState``; gloo on CPU-only hosts, so ``accelerate launch --multi_gpu`` or ``torchrun``
    shard an eval over CPU processes too (accelerate only picks a CPU backend when asked for ``cpu``)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _refuse_requantizing(model_id: str, variants: list[Variant]) -> None:
    """A saved quantized pipeline cannot take a recipe again: say so before anything is generated."""
    configs = Path(model_id).glob("*/config.json") if Path(model_id).is_dir() else []
    quantized = any("quantization_config" in json.loads(c.read_text()) for c in configs)
    recipes = [v.name for v in variants if v.recipe is not None]
    if quantized and recipes:
        raise DQError(
            f"--model {model_id} is already quantized, so variants {', '.join(recipes)} cannot quantize it again; "
            "pass the FP model with --variants fp,RECIPE,... (or evaluate this directory with --variants fp)."
        )


def _is_video_model(model_id: str) -> bool:
    """Whether the model makes clips, from its pipeline class (no weights are loaded)."""
    if model_id in reference.names():
        return bool(reference.is_video(model_id))
    index = Path(model_id) / "model_index.json"
    if not index.is_file():
        try:
            config = diffusers.DiffusionPipeline.load_config(model_id, local_files_only=True)
        except (OSError, ValueError):
            return False
        class_name = config.get("_class_name")
    else:
        class_name = json.loads(index.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    return cls is not None and "num_frames" in inspect.signature(cls.__call__).parameters


def _ensure_variant_info(run: RunDir, variants: list[Variant], builder: VariantBuilder) -> None:
    """Measure weight bytes of a variant whose info file is missing (e.g. deleted by hand) without generating."""
    for variant in variants:
        if not run.variant_path(variant.name).is_file():
            pipe, info = builder.build(variant)
            write_json(run.variant_path(variant.name), info)
            del pipe


def _assemble(run: RunDir, generation: dict, variants: list[Variant], scores: dict, metric_set: MetricSet,
              device: str) -> dict[str, Any]:
    """results.json: configuration, metric settings, and per variant its metrics, size and measured perf."""
    fp = next(v for v in variants if v.is_fp)
    results: dict[str, Any] = {
        "version": 1,
        "config": generation,
        "fp": fp.name,
        "perf": {"device": device, "num_processes": process_state().num_processes},
        "metric_settings": metric_set.settings,
        "skipped_metrics": metric_set.skipped,
        "variants": {},
    }
    for variant in variants:
        info_path = run.variant_path(variant.name)
        info = read_json(info_path) if info_path.is_file() else {}
        results["variants"][variant.name] = {
            "recipe": variant.recipe,
            "cache": variant.cache_spec,
            "quantization": info.get("quantization"),
            "weight_bytes": info.get("weight_bytes"),
            "metrics": scores.get(variant.name, {}),
            "perf": {**(summarize_perf(read_perf(run, variant.name)) or {}), "build_seconds": info.get("build_seconds")},
        }
    add_ratios(results, fp.name)
    return results


def _write_outputs(run: RunDir, results: dict[str, Any], items: list[Item], video: bool) -> None:
    write_json(run.root / "results.json", results)
    with atomic_file(run.root / "report.md") as tmp:
        tmp.write_text(markdown_report(results))
    write_grid(run.root / "grid.png", run, results, items, video)
    write_plot(run.root / "quality_vs_speed.png", results)


def results_table(results: dict[str, Any]) -> str:
    """The report table of a results dict, for printing."""
    return markdown_table(results)


def load_results(out: str | Path) -> Optional[dict[str, Any]]:
    """Read RUN/results.json, or None when the run has not finished."""
    path = Path(out) / "results.json"
    return read_json(path) if path.is_file() else None
