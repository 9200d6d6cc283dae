"""Evaluate quantized pipelines against FP: ``dq.eval.evaluate(EvalConfig(...))`` or ``dq eval ...``.

The work is done in ``dq.evaluation``; this module is the stable public surface.

Example:
    >>> from dq.eval import EvalConfig, ScoringConfig, evaluate
    >>> results = evaluate(EvalConfig(model="ref-sd", out="runs/sd", variants=["fp", "w8a8"], n=8))
    >>> results["variants"]["w8a8"]["perf"]["latency_ratio"]
"""

from dq.evaluation import EvalConfig, ScoringConfig, Variant, evaluate, load_results, parse_variants, read_prompts, results_table

__all__ = ["EvalConfig", "ScoringConfig", "Variant", "evaluate", "load_results", "parse_variants", "read_prompts", "results_table"]
