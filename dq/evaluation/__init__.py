"""Evaluation of quantized (and cached) pipelines against their FP baseline: seeded paired generation,
metrics, report. ``evaluate(EvalConfig(...))`` here, or ``dq eval ...`` from the shell; the modules each do one job:

- ``variants``: what is compared (``fp``, recipes, ``+cache``), parsed once for eval, the app and ``dq demo``;
- ``eval_config``: what a run is (model, variants, prompts, scoring) and the record a RUN keeps;
- ``prompts``: the run's prompts, from a file or the reference domain;
- ``rundir``: the RUN directory layout, its atomic writers, the configuration guard;
- ``generation``: resumable, sharded, timed image generation;
- ``scoring``: metric construction (before generation) and scoring against FP;
- ``report``: results.json, report.md, grid.png, quality_vs_speed.png;
- ``runner``: ``evaluate``, tying them together under ``accelerate``.

Example:
    >>> from dq.evaluation import EvalConfig, ScoringConfig, evaluate
    >>> results = evaluate(EvalConfig(model="ref-sd", out="runs/sd", variants=["fp", "w8a8"], n=8))
    >>> results["variants"]["w8a8"]["perf"]["latency_ratio"]
"""

from dq.evaluation.eval_config import EvalConfig, ScoringConfig
from dq.evaluation.prompts import read_prompts
from dq.evaluation.runner import evaluate, load_results, results_table
from dq.evaluation.variants import Variant, parse_variants

__all__ = ["EvalConfig", "ScoringConfig", "Variant", "evaluate", "load_results", "parse_variants", "read_prompts", "results_table"]
