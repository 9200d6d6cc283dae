"""Evaluation of quantized (and cached) pipelines against their FP baseline: seeded paired generation,
metrics, report. ``dq.eval`` is the public entry point; the modules here each do one job:

- ``config``: what a run is (model, variants, prompts, scoring) and input checks;
- ``rundir``: the RUN directory layout, atomic writes, the configuration guard;
- ``generation``: resumable, sharded, timed image generation;
- ``scoring``: metric construction (before generation) and scoring against FP;
- ``report``: results.json, report.md, grid.png, quality_vs_speed.png;
- ``runner``: ``evaluate``, tying them together under ``accelerate``.
"""

from dq.evaluation.config import EvalConfig, ScoringConfig, Variant, parse_variants, read_prompts
from dq.evaluation.runner import evaluate, load_results, results_table

__all__ = ["EvalConfig", "ScoringConfig", "Variant", "evaluate", "load_results", "parse_variants", "read_prompts", "results_table"]
