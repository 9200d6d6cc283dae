"""The Gradio Blocks app: pick a model and variants, type a prompt, see FP and quantized results side by side.

The UI is a thin shell over ``dq.app.generate``: ``GenerateHandler`` turns widget values into a
``GenerationRequest``, runs it through one shared ``Comparer`` (pipelines are cached across requests), and
turns the ``Comparison`` into widget values. Every failure reaches the browser as a ``gr.Error`` carrying the
DQError's message; the server keeps serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gradio as gr
import torch

from dq import CalibConfig, reference
from dq.app.generate import Comparer, Comparison, GenerationRequest, VariantResult, results_table
from dq.app.media import MediaDir, display_image, middle_frame, side_by_side
from dq.app.models import PipelineCache
from dq.app.variants import cache_choices, compose_variants, recipe_choices
from dq.errors import DQError
from dq.evaluation.variants import FP
from dq.metrics import LPIPS

logger = logging.getLogger(__name__)

DEFAULT_RECIPES = ("w8a8", "w4a8", "svdquant-w4a4")
CSS = "#dq-table table { font-variant-numeric: tabular-nums; } footer { display: none !important; }"


@dataclass
class AppConfig:
    """How the app runs.

    Args:
        model: The model shown at start (default: the first reference pipeline).
        device: Where pipelines run ("cuda" when available, else "cpu").
        dtype: Dtype pipelines are loaded in.
        steps: Default number of denoising steps.
        calib: A dq.CalibConfig for calibrating recipes; None uses each recipe's bundled default set.
        max_models: How many models (each with its variants) stay loaded.
        lpips_weights: Local torchvision AlexNet weights for LPIPS; None looks in the torch hub cache.
        warmup: Warm up each new pipeline with an untimed 1-step call before timing it.
        recipes: Recipes ticked at start (those that are bundled).
    """

    model: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    steps: int = 20
    calib: Optional[CalibConfig] = None
    max_models: int = 1
    lpips_weights: Optional[str] = None
    warmup: bool = True
    recipes: tuple[str, ...] = DEFAULT_RECIPES

    def resolved_device(self) -> torch.device:
        """The configured device, or CUDA when available, else CPU."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        """The configured dtype, or bfloat16 on CUDA and float32 on CPU."""
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


def default_model() -> str:
    """The first reference pipeline whose weights are installed (else the first one)."""
    installed = [n for n in reference.names() if (reference.path(n) / "model_index.json").is_file()]
    return (installed or reference.names())[0]


def _optional_int(value: Any) -> Optional[int]:
    """An empty or zero size means "the model's default" (the browser sends 0 for an empty number box)."""
    return None if value in (None, "", 0) else int(value)


def _optional_float(value: Any) -> Optional[float]:
    """An empty guidance box means "the pipeline's default"; anything else must be a number."""
    if value is None or not str(value).strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise DQError(f"guidance {value!r} is not a number; type e.g. 4.5, or leave it empty for the default.") from None


class GenerateHandler:
    """The generate event: widget values in, slider / clip / gallery / table / status out.

    Args:
        comparer: The shared Comparer (and its PipelineCache).
        media: Where GIFs are written.
    """

    def __init__(self, comparer: Comparer, media: MediaDir) -> None:
        self.comparer = comparer
        self.media = media

    def request(self, model: str, prompt: str, negative_prompt: str, seed: Any, steps: Any, guidance: Any,
                height: Any, width: Any, num_frames: Any, recipes: list[str], caches: list[str],
                extra: str) -> GenerationRequest:
        """Build the request from widget values (empty numbers mean "the model's default")."""
        return GenerationRequest(
            model=(model or "").strip(), prompt=prompt or "",
            variants=compose_variants(recipes or [], caches or [], extra or ""),
            negative_prompt=negative_prompt or "", seed=int(seed or 0), steps=int(steps or 1),
            guidance=_optional_float(guidance), height=_optional_int(height), width=_optional_int(width),
            num_frames=_optional_int(num_frames),
        )

    def outputs(self, comparison: Comparison, compare: Optional[str]) -> tuple:
        """Widget values: (slider pair, side-by-side clip or None, gallery, table, status markdown)."""
        target = self._target(comparison, compare)
        fp_frame = display_image(middle_frame(comparison.fp.pixels))
        slider = (fp_frame, display_image(middle_frame(target.pixels)))
        gallery = []
        for r in comparison.results:
            caption = f"{r.spec.name} · {r.seconds:.2f} s"
            if r.psnr is not None:
                caption += f" · PSNR {r.psnr:.1f} dB"
            item = self.media.gif(r.pixels, r.spec.name) if comparison.video else display_image(r.pixels)
            gallery.append((item, caption))
        clip = None
        if comparison.video:
            clip = self.media.gif(side_by_side([comparison.fp.pixels, target.pixels]), f"fp-vs-{target.spec.name}")
        headers, rows = results_table(comparison)
        return slider, clip, gallery, {"headers": headers, "data": rows}, self.status(comparison, target.spec.name)

    @staticmethod
    def _target(comparison: Comparison, compare: Optional[str]) -> VariantResult:
        """The variant the slider compares with FP: the one asked for, else the first non-FP one."""
        if compare:
            try:
                return comparison.result(compare)
            except DQError:
                pass  # the selection changed since the dropdown was filled: fall back to the first variant
        return comparison.results[1] if len(comparison.results) > 1 else comparison.fp

    @staticmethod
    def status(comparison: Comparison, target: str) -> str:
        """A markdown summary of the run: model, settings, device, what was built, notes."""
        req = comparison.request
        shape = comparison.fp.pixels.shape
        size = f"{shape[-2]}x{shape[-3]}" + (f", {shape[0]} frames" if comparison.video else "")
        lines = [
            f"**{req.model}** · {size} · {req.steps} steps · seed {req.seed} · {comparison.device} · "
            f"slider: FP vs **{target}**",
            f"Peak memory: {comparison.fp.memory_source.replace('_', ' ')} (all loaded variants included); "
            "latency: one image (or clip); per step: denoiser time / steps.",
        ]
        lines += [f"- {note}" for note in comparison.notes]
        return "\n\n".join(lines)

    def __call__(self, model: str, prompt: str, negative_prompt: str, seed: Any, steps: Any, guidance: Any,
                 height: Any, width: Any, num_frames: Any, recipes: list[str], caches: list[str], extra: str,
                 compare: Optional[str], progress: Optional[gr.Progress] = None) -> tuple:
        """Run a request; raise gr.Error (with the DQError message) on any failure."""
        try:
            request = self.request(model, prompt, negative_prompt, seed, steps, guidance, height, width,
                                   num_frames, recipes, caches, extra)
            report = (lambda fraction, desc: progress(fraction, desc=desc)) if progress is not None else None
            comparison = self.comparer.compare(request, report)
            result = self.outputs(comparison, compare)
        except DQError as error:
            raise gr.Error(str(error), title="dq", print_exception=False) from None
        except torch.OutOfMemoryError as error:
            # Free the quantized copies so the next (smaller) request can run; FP pipelines stay loaded.
            self.comparer.cache.evict(keep_fp=True)
            raise gr.Error(
                f"out of memory: {str(error).splitlines()[0]} The quantized variants were unloaded; "
                "try fewer variants, fewer frames or a smaller size.", title="dq: out of memory",
            ) from None
        except Exception as error:  # a diffusers/torch failure: show it, keep serving
            logger.exception("dq app: generation failed")
            raise gr.Error(f"{type(error).__name__}: {error}", title="dq: generation failed") from None
        return result


def build_demo(config: Optional[AppConfig] = None, cache: Optional[PipelineCache] = None) -> gr.Blocks:
    """The Gradio Blocks app (not launched).

    Args:
        config: How the app runs; defaults to AppConfig().
        cache: A PipelineCache to share (tests reuse theirs); built from ``config`` when None.

    Example:
        >>> demo = build_demo(AppConfig(model="ref-sd"))
        >>> launch(demo)
    """
    config = config or AppConfig()
    cache = cache or PipelineCache(config.resolved_device(), config.resolved_dtype(), config.calib, config.max_models)

    def make_lpips() -> LPIPS:
        return LPIPS("alex", weights_path=config.lpips_weights)

    handler = GenerateHandler(Comparer(cache, make_lpips, config.warmup), MediaDir())
    references = reference.names()
    model_value = config.model or default_model()
    recipes = recipe_choices()
    caches = cache_choices()
    prompts = reference.prompts("heldout", 4)
    ticked = [r for r in config.recipes if r in recipes]

    def with_progress(fn: GenerateHandler) -> Callable[..., tuple]:
        """Generate with gr.Progress(track_tqdm=True): calibration, packing and sampling bars show in the UI."""

        def generate(model: str, prompt: str, negative_prompt: str, seed: float, steps: float,
                     guidance: str, height: Optional[float], width: Optional[float],
                     num_frames: Optional[float], recipes: list[str], caches: list[str], extra: str,
                     compare: Optional[str], progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
            """Generate the prompt with FP and every selected variant; return slider, clip, gallery, table, status."""
            slider, clip, gallery, table, status = fn(model, prompt, negative_prompt, seed, steps, guidance, height,
                                                      width, num_frames, recipes, caches, extra, compare, progress)
            return slider, gr.Image(value=clip, visible=clip is not None), gallery, table, status

        return generate

    def compare_choices(recipes: list[str], caches: list[str], extra: str, current: Optional[str]) -> gr.Dropdown:
        names = [n for n in compose_variants(recipes or [], caches or [], extra or "") if n != FP]
        value = current if current in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value)

    with gr.Blocks(title="dq: FP vs quantized") as demo:
        gr.Markdown(
            "# dq: FP vs quantized\nPick a model and recipes, type a prompt: every variant is generated from the "
            "same seed and compared with the FP pipeline. Quantized models are built on first use and reused."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = gr.Dropdown(
                    choices=references, value=model_value, allow_custom_value=True, filterable=True, label="Model",
                    info="a reference pipeline, a local diffusers directory (dq-quantized ones too) or a hub id",
                )
                prompt = gr.Textbox(value=prompts[0], label="Prompt", lines=2)
                negative = gr.Textbox(value="", label="Negative prompt")
                recipe_box = gr.CheckboxGroup(recipes, value=ticked, label="Recipes (FP is always generated)")
                cache_box = gr.CheckboxGroup(
                    caches, value=[], label="Step caches (each applied to FP and every recipe)", visible=bool(caches),
                )
                initial = [n for n in compose_variants(ticked) if n != FP]
                compare = gr.Dropdown(initial, value=initial[0] if initial else None, label="Slider: FP vs", allow_custom_value=True)
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        steps = gr.Slider(1, 100, value=config.steps, step=1, label="Steps")
                    with gr.Row():
                        guidance = gr.Textbox(value="", label="Guidance", placeholder="pipeline default")
                        height = gr.Number(value=None, precision=0, minimum=0, label="Height", info="0 = model default")
                        width = gr.Number(value=None, precision=0, minimum=0, label="Width", info="0 = model default")
                        frames = gr.Number(value=None, precision=0, minimum=0, label="Frames", info="video; 0 = default")
                with gr.Accordion("More variants", open=False):
                    extra = gr.Textbox(
                        value="", label="Variants", placeholder="w4a8+deepcache:interval=5, my-recipe.yaml",
                        info="comma-separated, as in `dq eval --variants`",
                    )
                run = gr.Button("Generate", variant="primary", elem_id="dq-generate")
                gr.Examples([[p] for p in prompts], inputs=[prompt], label="Prompts")
            with gr.Column(scale=4):
                slider = gr.ImageSlider(label="FP vs quantized", type="pil", format="png", elem_id="dq-slider", buttons=["download", "fullscreen"])
                clip = gr.Image(label="Clips side by side: FP | variant", type="filepath", visible=False,
                                buttons=["download", "fullscreen"])
                table = gr.Dataframe(label="Cost per variant; PSNR and LPIPS of its image against FP",
                                     interactive=False, elem_id="dq-table", wrap=True)
                status = gr.Markdown(elem_id="dq-status")
                gallery = gr.Gallery(label="Every variant", columns=4, format="png", object_fit="contain",
                                     buttons=["download", "fullscreen"])

        inputs = [model, prompt, negative, seed, steps, guidance, height, width, frames, recipe_box, cache_box, extra,
                  compare]
        outputs = [slider, clip, gallery, table, status]
        generate = with_progress(handler)
        run.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1, concurrency_id="gpu")
        prompt.submit(generate, inputs, outputs, api_name="generate_on_submit", api_visibility="private",
                      concurrency_limit=1, concurrency_id="gpu")
        for name, box in (("recipes", recipe_box), ("caches", cache_box), ("extra", extra)):
            box.change(compare_choices, [recipe_box, cache_box, extra, compare], compare,
                       api_name=f"compare_choices_{name}", api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, **kwargs: Any) -> Any:
    """Launch the app with dq's theme and CSS (Gradio 6 takes them in launch()); returns launch()'s result.

    Args:
        demo: The Blocks from build_demo.
        kwargs: Passed to ``demo.launch`` (server_name, server_port, prevent_thread_lock, ...).
    """
    return demo.launch(theme=gr.themes.Soft(), css=CSS, **kwargs)
