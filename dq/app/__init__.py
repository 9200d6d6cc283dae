"""The Gradio side-by-side demo (``python app.py`` / ``dq app``): FP and quantized results with their cost.

``dq.app.variants`` offers what can be compared (names are parsed by ``dq.evaluation.variants``),
``dq.app.models`` builds and caches pipelines per ``(model, recipe)``, ``dq.app.generate`` generates, times and
scores without any UI, and ``dq.app.ui`` is the Gradio Blocks shell over them.
"""

from dq.app.generate import Comparer, Comparison, GenerationRequest, VariantResult, results_table
from dq.app.models import PipelineCache
from dq.app.ui import AppConfig, GenerateHandler, build_demo, launch
from dq.app.variants import cache_choices, compose_variants, recipe_choices

__all__ = [
    "AppConfig",
    "Comparer",
    "Comparison",
    "GenerateHandler",
    "GenerationRequest",
    "PipelineCache",
    "VariantResult",
    "build_demo",
    "cache_choices",
    "compose_variants",
    "launch",
    "recipe_choices",
    "results_table",
]
