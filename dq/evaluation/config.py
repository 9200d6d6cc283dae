"""What an eval run is: the model, the variants, the prompts and seeds, and how images are scored.

Everything here is checked before any model is loaded, so bad input (an empty prompt file, an unknown
recipe or cache, a missing model directory) fails in seconds with a DQError that names it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dq.errors import DQError

FP = "fp"
REFERENCE_PROMPTS = "reference"
DEFAULT_REFERENCE_N = 16
CONFIG_VERSION = 1


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: the FP pipeline, or a recipe applied to a fresh copy, plus optional caching.

    Args:
        name: The label used in file names and the report (e.g. ``"svdquant-w4a4+deepcache"``).
        recipe: A recipe name or YAML path; None for the FP pipeline.
        cache: A cache spec for ``dq.enable_cache`` (the text after ``+``); None for no caching.
    """

    name: str
    recipe: Optional[str] = None
    cache: Optional[str] = None

    @property
    def is_fp(self) -> bool:
        """Whether this is the unquantized, uncached baseline."""
        return self.recipe is None and self.cache is None


def split_variant_list(spec: str) -> list[str]:
    """Split ``--variants`` on commas, keeping cache options together (``"fp,w8a8+deepcache:interval=5,branch=0"``)."""
    names: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if names and "=" in token and "+" not in token and "+" in names[-1]:
            names[-1] += "," + token  # another key=value of the previous variant's cache options
        else:
            names.append(token)
    return names


def parse_variants(spec: str | list[str]) -> list[Variant]:
    """Parse ``"fp,w8a8,svdquant-w4a4+deepcache"`` into variants, FP first (added when missing).

    Each recipe is loaded and each cache spec parsed now, so an unknown name fails before generation.

    Args:
        spec: Comma-separated variant names, or a list of them. A name is ``fp`` or a recipe, optionally
            followed by ``+CACHE[:key=value,...]`` (see ``dq.cache.parse_variant``).

    Example:
        >>> [v.name for v in parse_variants("w8a8,w8a8+deepcache:interval=3")]
        ['fp', 'w8a8', 'w8a8+deepcache:interval=3']
    """
    from dq.recipes import load_recipe

    names = split_variant_list(spec) if isinstance(spec, str) else [s.strip() for s in spec if s.strip()]
    if not names:
        raise DQError("--variants is empty; expected e.g. 'fp,w8a8,svdquant-w4a4'.")
    variants: list[Variant] = []
    for name in names:
        recipe, cache = parse_cache_variant(name)
        if recipe is not None:
            load_recipe(recipe)  # raises a DQError listing the bundled recipes
        if any(v.name == name for v in variants):
            raise DQError(f"variant {name!r} is listed twice in --variants.")
        variants.append(Variant(name=name, recipe=recipe, cache=cache))
    if not any(v.is_fp for v in variants):
        variants.insert(0, Variant(FP))
    variants.sort(key=lambda v: not v.is_fp)  # FP first: every other variant is scored against it
    return variants


def parse_cache_variant(name: str) -> tuple[Optional[str], Optional[str]]:
    """``"recipe+cache:opts"`` -> (recipe or None for FP, cache spec or None); the cache spec is validated."""
    head, plus, tail = name.partition("+")
    if plus:
        cache_config(name)  # an unknown cache method or option raises here
        return (None if head.strip() in ("", FP) else head.strip()), tail
    return (None if head.strip() == FP else head.strip()), None


def cache_config(name: str) -> Any:
    """The cache config of a ``recipe+cache`` variant, from dq.cache's parser."""
    from dq.cache import parse_variant

    return parse_variant(name)[1]


def read_prompts(source: str, n: Optional[int], video: bool = False) -> list[str]:
    """Return the evaluation prompts: the first ``n`` of a file (cycled if shorter), or the reference held-out set.

    A prompt file is UTF-8 text with one prompt per line (blank lines and lines starting with ``#`` are
    skipped) or a ``.json`` list of strings.

    Args:
        source: A file path, or ``"reference"`` for the reference domain's held-out prompts.
        n: How many prompts; None means every prompt in the file (16 for ``"reference"``).
        video: Draw the reference domain's video prompts.

    Example:
        >>> read_prompts("reference", 4)[0]
        'a small ...'
    """
    if n is not None and n < 1:
        raise DQError(f"--n {n}: expected a positive number of prompts.")
    if source == REFERENCE_PROMPTS:
        from dq import reference

        count = n or DEFAULT_REFERENCE_N
        return list(reference_prompts(reference, count, video))
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DQError(
            f"--prompts {source}: cannot read it ({error}); expected a UTF-8 text file with one prompt per line, "
            "a .json list of strings, or 'reference'."
        ) from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise DQError(f"--prompts {source}: invalid JSON ({error}); expected a list of strings.") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DQError(f"--prompts {source}: expected a JSON list of strings.")
        prompts = [p.strip() for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DQError(f"--prompts {source}: the file has no prompts; expected one prompt per line.")
    count = n or len(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


def reference_prompts(reference: Any, n: int, video: bool) -> list[str]:
    """Held-out prompts of the reference domain (the video vocabulary for the video pipeline)."""
    return list(reference.prompts("heldout", n, video=video))


def check_model(model: str) -> str:
    """Return the canonical model identifier, or raise when it is neither a reference name, a directory, nor a hub id."""
    from dq import reference

    names = reference_names(reference)
    if model in names:
        return model
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DQError(f"--model {model}: is a file; expected a diffusers pipeline directory (with model_index.json).")
        if not (path / "model_index.json").is_file():
            raise DQError(f"--model {model}: no model_index.json in that directory; expected a diffusers pipeline.")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DQError(
            f"--model {model}: no such directory, and not a hub id (org/name) or a reference pipeline "
            f"({', '.join(names) or 'none installed'})."
        )
    return model


def reference_names(reference: Any) -> list[str]:
    """The reference pipeline names dq.reference offers (empty while it has none)."""
    names = getattr(reference, "names", None)
    return list(names()) if callable(names) else []


@dataclass
class ScoringConfig:
    """How images are scored; changing it re-scores a run without regenerating images.

    Args:
        metrics: Metric names, or None for every metric whose weights are available.
        fid_backbone: ``"inception"``, ``"clip"`` (the --clip-model), an open_clip model name, or None for the
            default (the domain CLIP for reference pipelines, Inception otherwise).
        fid_weights: Local weights of the FID backbone.
        clip_model: ``"domain"``, an open_clip name (``local-dir:``/``hf-hub:`` ids too), a local transformers CLIP
            directory, or None for the default (the domain CLIP for reference pipelines).
        clip_weights: Local checkpoint of an open_clip ``clip_model`` name.
        lpips_weights: Local torchvision backbone weights for LPIPS.
        lpips_net: LPIPS backbone, ``"alex"`` or ``"vgg"``.
        antialias: Antialias when resizing images for FID and CLIP.
    """

    metrics: Optional[list[str]] = None
    fid_backbone: Optional[str] = None
    fid_weights: Optional[str] = None
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    lpips_weights: Optional[str] = None
    lpips_net: str = "alex"
    antialias: bool = True


@dataclass
class EvalConfig:
    """One eval run: the generation settings (fixed for the life of a RUN directory) and the scoring settings.

    Args:
        model: A reference pipeline name, a local diffusers directory, or a hub id.
        out: The RUN directory.
        variants: Variant names (a list, or one comma-separated string); ``"fp"`` is added first when missing.
        prompts: A prompt file or ``"reference"``.
        n: Number of prompts (None: the whole file, 16 for ``"reference"``).
        seed: Image ``i`` uses the seed ``seed + i``.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale; None keeps the pipeline's default.
        height, width, num_frames: Output size; None keeps the pipeline's default.
        batch_size: Prompts per pipeline call. Batches are fixed slices of the prompt list, so any number of
            processes produces the same images.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None picks float16 on CUDA and float32 on CPU.
        scoring: How images are scored.
        overwrite: Replace a RUN made with a different configuration.

    Example:
        >>> cfg = EvalConfig(model="ref-sd", out="runs/sd", variants=["fp", "w8a8"], prompts="reference", n=8)
        >>> dq.eval.evaluate(cfg)["variants"]["w8a8"]["metrics"]["psnr"]["value"]
    """

    model: str
    out: str | Path
    variants: str | list[str] = field(default_factory=lambda: [FP])
    prompts: str = REFERENCE_PROMPTS
    n: Optional[int] = None
    seed: int = 0
    steps: int = 20
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    batch_size: int = 4
    dtype: Optional[str] = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise DQError(f"--batch-size {self.batch_size}: expected a positive number.")
        if self.steps < 1:
            raise DQError(f"--steps {self.steps}: expected a positive number of denoising steps.")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise DQError(f"--dtype {self.dtype}: expected float32, float16 or bfloat16.")


def generation_record(cfg: EvalConfig, model_id: str, variants: list[Variant], prompts: list[str], dtype: str) -> dict:
    """The part of a run's configuration that determines its images; a RUN directory keeps it for life."""
    from dq.recipes import load_recipe

    return {
        "model": model_id,
        "variants": [
            {**asdict(v), "recipe_spec": None if v.recipe is None else load_recipe(v.recipe).to_dict()} for v in variants
        ],
        "prompts": {"source": cfg.prompts, "count": len(prompts), "sha256": prompts_digest(prompts)},
        "seed": cfg.seed,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "batch_size": cfg.batch_size,
        "dtype": dtype,
    }


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of the prompt list, so a changed prompt file is noticed."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``key: old -> new`` lines for every generation setting that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = json.dumps(old.get(key))[:120], json.dumps(new.get(key))[:120]
            lines.append(f"{key}: {before} -> {after}")
    return lines
