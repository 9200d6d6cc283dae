"""LoRA on dq-quantized denoisers: diffusers' `load_lora_weights`, `set_adapters`, `delete_adapters`,
`fuse_lora` / `unfuse_lora` and `unload_lora_weights`, per denoiser instance (`enable_lora`).

diffusers reads every format its loaders know (diffusers/PEFT, kohya sd-scripts and A1111 names with `alpha`,
the BFL / XLabs FLUX layouts) and hands the converted LoRA to the model's `load_lora_adapter`, which PEFT
injects. dq wraps that method and `fuse_lora` / `unfuse_lora` of this instance (the classes stay untouched):

- before anything is injected, the LoRA is checked against the model: a missing module, a layer kind LoRA
  cannot target, factors of the wrong shape, or a LyCORIS type diffusers does not load (LoKr, LoHa) raise a
  DQError naming the module or the type, and the model stays as it was;
- a load that fails inside diffusers or PEFT is rolled back (the half-injected adapter deleted);
- after injection, PEFT's wrappers around dq layers get dq's subclass of their class (dq.pipelines.lora_layers):
  adapters on SVDQuant layers run inside the low-rank branch and fuse into it exactly; on other quantized
  layers they are 16-bit side branches, and fusing them is refused before anything fuses.

Unloading or deleting an adapter removes PEFT's wrappers and leaves the quantized layers as they were.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file
from torch import nn

from dq.errors import DQError
from dq.nn import quant_layers
from dq.pipelines.lora_layers import adopt_lora_wrappers, fuse_refusal, unfusable_layers

logger = logging.getLogger(__name__)

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias")


def _read_state_dict(source: Any) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors when `source` is a dict or a local .safetensors file; None for other sources (hub ids, dirs)."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)) and str(source).endswith(".safetensors") and Path(source).is_file():
        return load_file(str(source))
    return None


def _peft_keys(state_dict: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """The state dict as diffusers will inject it: prefix stripped, converted to PEFT key names."""
    sd = state_dict
    if prefix is not None:
        sd = {k.removeprefix(f"{prefix}."): v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    if sd and "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    return sd


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple, tuple] | None:
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels // module.groups, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return None


def validate_lora(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None = None) -> list[str]:
    """Check a LoRA state dict against `model` before injection; returns the module names it targets.

    Raises DQError naming the module when a target is missing, is not a Linear/Conv2d, or when a factor
    shape does not match the layer (the model is not touched).

    Example:
        >>> validate_lora(pipe.unet, safetensors.torch.load_file("style.safetensors"), prefix="unet")
    """
    sd = _peft_keys(state_dict, prefix)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not suffix.endswith(".weight"):
            continue
        factors.setdefault(key[: -len(suffix)], {})[suffix.split(".")[1]] = value
    if not factors:
        return []
    problems = []
    for name, pair in sorted(factors.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r} does not exist in {type(model).__name__}")
            continue
        if hasattr(module, "get_base_layer"):  # already wrapped by PEFT for an earlier adapter
            module = module.get_base_layer()
        if "lora_A" not in pair or "lora_B" not in pair:
            problems.append(f"module {name!r} has only {sorted(pair)}; a LoRA needs both lora_A and lora_B")
            continue
        rank = pair["lora_A"].shape[0]
        expected = _expected_shapes(module, rank)
        if expected is None:
            problems.append(f"module {name!r} is a {type(module).__name__}; LoRA targets Linear or Conv2d layers")
            continue
        got = (tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape))
        if got != expected:
            problems.append(
                f"module {name!r}: lora_A {list(got[0])} / lora_B {list(got[1])} do not fit the layer "
                f"(expected {list(expected[0])} / {list(expected[1])})"
            )
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DQError(
            f"this LoRA does not match the model: {shown}. It was trained for another architecture or size; "
            "load a LoRA made for this base model. The model was not changed."
        )
    return sorted(factors)


# LyCORIS factor names (LyCORIS' own key suffixes) of the adapter types diffusers does not convert to LoRA.
_LYCORIS_TYPES = {"LoKr": re.compile(r"\.lokr_(w1|w2|t2)(_a|_b)?$"), "LoHa": re.compile(r"\.hada_(w1|w2|t1|t2)(_a|_b)?$")}


def check_lora_type(state_dict: dict[str, torch.Tensor]) -> None:
    """DQError naming the adapter type when the state dict holds a LyCORIS type diffusers cannot load."""
    for kind, pattern in _LYCORIS_TYPES.items():
        keys = [k for k in state_dict if pattern.search(k)]
        if keys:
            raise DQError(
                f"this is a {kind} adapter ({keys[0]!r}, {len(keys)} such tensors); diffusers loads LoRA (incl. "
                "kohya/A1111 and FLUX formats) and PEFT LoRA variants such as DoRA, but not LyCORIS "
                f"{kind}. Convert it to a LoRA, or load a LoRA. The pipeline was not changed."
            )


def _adapter_names(model: nn.Module) -> set[str]:
    """Every adapter name the model knows (its peft_config, and any layer holding factors of one)."""
    names = set(getattr(model, "peft_config", {}) or {})
    for module in model.modules():
        names.update(getattr(module, "lora_A", {}) or {})
    return names


def _remove_adapters(model: nn.Module, names: set[str]) -> None:
    """Take the named (half-injected) adapters out of every layer and out of the model's config."""
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and hasattr(module, "delete_adapter"):
            for name in names & set(lora_a):
                module.delete_adapter(name)
    for name in names:
        (getattr(model, "peft_config", None) or {}).pop(name, None)


def enable_lora(model: nn.Module) -> None:
    """Make diffusers' LoRA loading and fusing on `model` (and its pipeline's) dq-aware. Idempotent.

    Wraps this instance's `load_lora_adapter` and `fuse_lora` (the class is untouched): validate, let
    diffusers/PEFT inject (rolled back if that fails), then give PEFT's wrappers around dq layers dq's forward
    and fuse rules (dq.pipelines.lora_layers); refuse a fuse that some layer cannot take before anything fuses.
    The checkpoint's layer plans follow a fused branch's rank by themselves (DQConfig.bind).

    Example:
        >>> dq.quantize(pipe, "svdquant-w4a4", calib=...)   # calls enable_lora(pipe.unet)
        >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")
        >>> pipe.set_adapters(["style"], [0.8]); pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()
    """
    original = getattr(model, "load_lora_adapter", None)
    if original is None or getattr(original, "_dq_wrapped", False):
        return
    original_fuse = model.fuse_lora

    @functools.wraps(original)
    def load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs):
        prefix = args[0] if args else kwargs.get("prefix", "transformer")
        state_dict = _read_state_dict(pretrained_model_name_or_path_or_dict)
        if state_dict is not None:
            check_lora_type(state_dict)
            targets = validate_lora(model, state_dict, prefix)
            if not targets and any(k.endswith(_LORA_SUFFIXES) for k in state_dict):
                logger.info("dq: no LoRA keys for prefix %r in this state dict", prefix)
            pretrained_model_name_or_path_or_dict = state_dict
        before = _adapter_names(model)
        try:
            result = original(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        except Exception as error:
            _remove_adapters(model, _adapter_names(model) - before)
            raise DQError(f"loading the LoRA failed ({type(error).__name__}: {error}); the model was left as it was.") from error
        adopt_lora_wrappers(model)
        return result

    @functools.wraps(original_fuse)
    def fuse_lora(lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None):
        refused = unfusable_layers(model, adapter_names)
        if refused:
            raise fuse_refusal(refused)
        original_fuse(lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    load_lora_adapter._dq_wrapped = True
    model.load_lora_adapter = load_lora_adapter
    model.fuse_lora = fuse_lora


def _module_of(key: str, prefix: str) -> str:
    """The module a LoRA key belongs to, as named in the model before PEFT wrapped it."""
    return key.removeprefix(prefix).rsplit(".lora_", 1)[0]


def enable_pipeline_lora(pipe: Any) -> None:
    """Make `pipe.load_lora_weights` dq-aware before diffusers converts the file. Idempotent.

    LyCORIS types get a DQError naming them (instead of diffusers' "keys have not been correctly renamed"),
    and FLUX pipelines, which widen LoRA factors for Control LoRAs by reading the transformer's float
    state dict, do that only for layers dq keeps in float: packed layers have no float weight to read, and
    a LoRA that does not fit them is refused by the model's check instead.
    """
    original = getattr(pipe, "load_lora_weights", None)
    if original is None or getattr(original, "_dq_wrapped", False):
        return

    @functools.wraps(original)
    def load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs):
        source = pretrained_model_name_or_path_or_dict
        weight_name = kwargs.get("weight_name")
        if isinstance(source, (str, Path)) and weight_name and Path(source, weight_name).is_file():
            source = Path(source, weight_name)
        state_dict = _read_state_dict(source)
        if state_dict is not None:
            check_lora_type(state_dict)
        return original(pretrained_model_name_or_path_or_dict, *args, **kwargs)

    load_lora_weights._dq_wrapped = True
    pipe.load_lora_weights = load_lora_weights
    expand = getattr(pipe, "_maybe_expand_lora_state_dict", None)
    if expand is not None:

        def expand_float_layers_only(transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            prefix = f"{getattr(pipe, 'transformer_name', 'transformer')}."
            packed = {name.replace(".base_layer", "") for name, _ in quant_layers(transformer)}
            kept = {k: v for k, v in lora_state_dict.items() if _module_of(k, prefix) in packed}
            rest = expand(transformer=transformer, lora_state_dict={k: v for k, v in lora_state_dict.items() if k not in kept})
            return {**rest, **kept}

        pipe._maybe_expand_lora_state_dict = expand_float_layers_only
