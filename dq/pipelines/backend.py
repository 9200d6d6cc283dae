"""dq as a diffusers quantization backend: `import dq` makes quant_method "dq" load and save natively."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from safetensors import safe_open

from dq.calib import quantize_model
from dq.calib.timestep import attach_timestep_hook
from dq.errors import DQError
from dq.nn import quant_layers, swap_layers
from dq.nn.swap import plan_of
from dq.pipelines.config import DQConfig
from dq.pipelines.lora import enable_lora
from dq.recipes import Recipe

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def layer_plans_of(model: torch.nn.Module) -> dict[str, dict]:
    """The plan of every quantized layer in `model`, as stored in quantization_config.modules."""
    return {name: plan_of(layer).to_dict() for name, layer in quant_layers(model)}


def attach_quantizer(model: torch.nn.Module, recipe: Recipe) -> None:
    """Mark a model quantized by dq.quantize as diffusers marks one loaded quantized, so save_pretrained works."""
    config = DQConfig(recipe=recipe.to_dict(), modules=layer_plans_of(model))
    config.bind(model)
    model.register_to_config(quantization_config=config)
    quantizer = DQQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    enable_lora(model)  # LoRA loading validates and runs adapters inside SVDQ branches (dq.pipelines.lora)


def _checkpoint_tensors(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None, str]]:
    """Shape, dtype and file of every tensor in safetensors checkpoint files, read from their headers only."""
    found = {}
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                found[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()), str(path))
    return found


@torch.no_grad()
def _realign(model: torch.nn.Module, alignment: int = 64) -> None:
    """Copy CPU tensors that sit at unaligned offsets of the memory-mapped checkpoint.

    CPU BLAS picks its reduction order by pointer alignment, so an unaligned weight gives results that
    differ in the last bit from the same weight freshly allocated: a reload would not be bit-identical.
    """
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        store[name] = tensor.clone()


class DQQuantizer(DiffusersQuantizer):
    """Rebuilds dq-quantized layers before weights load (pre-quantized), or quantizes after (data-free)."""

    use_keep_in_fp32_modules = True
    requires_calibration = False

    def __init__(self, quantization_config: DQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._checkpoint: dict[str, tuple[tuple[int, ...], torch.dtype | None, str]] = {}
        self._quantized_prefixes: tuple[str, ...] = ()

    # -- loading a pre-quantized checkpoint ------------------------------------------------------
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._checkpoint = _checkpoint_tensors(checkpoint_files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if not self.pre_quantized:
            return model
        plans = self.quantization_config.layer_plans()
        try:
            layers = swap_layers(model, plans, init_scales=False)
        except AttributeError as e:
            raise DQError(f"quantization_config names a module this {type(model).__name__} does not have: {e}") from None
        for layer in layers.values():
            layer.allocate_deployed(device="meta")
        self._quantized_prefixes = tuple(f"{name}." for name in layers)
        self._validate_checkpoint(model)
        return model

    def _validate_checkpoint(self, model: torch.nn.Module) -> None:
        """Refuse, before anything loads, a checkpoint whose dq tensors do not match quantization_config."""
        if not self._checkpoint:
            return
        expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k.startswith(self._quantized_prefixes)}
        found = {k: v[:2] for k, v in self._checkpoint.items() if k.startswith(self._quantized_prefixes)}
        problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
        problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
        for k in sorted(set(expected) & set(found)):
            (eshape, edtype), (fshape, fdtype) = expected[k], found[k]
            # Float tensors outside dq's packed buffers (bias) may be stored in another float dtype.
            float_ok = edtype.is_floating_point and fdtype is not None and fdtype.is_floating_point and not k.endswith(("qweight", "weight_scale", "weight_zero"))
            if eshape != fshape or (edtype != fdtype and not float_ok):
                problems.append(f"{k}: expected {list(eshape)} {edtype}, found {list(fshape)} {fdtype}")
        if problems:
            shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise DQError(
                f"checkpoint tensors do not match its quantization_config: {shown}. "
                "The checkpoint is damaged or was written by another dq version; re-export it with dq.quantize + save_pretrained."
            )

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return self.pre_quantized and param_name.startswith(self._quantized_prefixes) and not param_name.endswith(".bias")

    def check_quantized_param_shape(self, param_name: str, current_param, loaded_param) -> bool:
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise DQError(f"checkpoint tensor {param_name} has shape {list(loaded_param.shape)}; quantization_config expects {list(current_param.shape)}.")
        return True

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict, unexpected_keys, **kwargs) -> None:
        """dq tensors load exactly as stored, so a reload is bit-identical.

        diffusers casts floating tensors to the requested `dtype` before this hook (fp16 scales to bf16
        would lose bits), so a cast tensor is read again from the checkpoint file.
        """
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._buffers.get(tensor_name)
        if current is not None and current.dtype != param_value.dtype and param_name in self._checkpoint:
            with safe_open(self._checkpoint[param_name][2], framework="pt") as f:
                param_value = f.get_tensor(param_name)
        if current is None or current.dtype != param_value.dtype or current.shape != param_value.shape:
            raise DQError(f"checkpoint tensor {param_name} ({param_value.dtype}, {list(param_value.shape)}) does not match the quantized layer.")
        module._buffers[tensor_name] = param_value.to(target_device)

    # -- quantizing at load time (data-free recipes) ----------------------------------------------
    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        self.quantization_config.bind(model)
        if self.pre_quantized:
            _realign(model)
            attach_timestep_hook(model)  # per-timestep activation scales select their group per call
            enable_lora(model)
            return model
        recipe = self.quantization_config.recipe_obj
        if recipe.needs_data:
            raise DQError(
                f"recipe {recipe.name!r} calibrates on data and cannot run inside from_pretrained; "
                "load the float pipeline and call dq.quantize(pipe, recipe, calib=dq.CalibConfig(...))."
            )
        quantize_model(model, recipe)
        self.quantization_config.modules = layer_plans_of(model)
        self.pre_quantized = True
        enable_lora(model)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _transformers_config_class() -> type:
    """transformers' twin of DQConfig (same __init__ signature, as PipelineQuantizationConfig requires).

    dq quantizes diffusion denoisers only, so building it for a transformers component (a text encoder)
    is refused with a message that says how to pick components.
    """
    from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersConfigMixin

    class DQTransformersConfig(TransformersConfigMixin):
        def __init__(self, recipe: str | dict = "w8a8", modules: dict | None = None, version: int = 1, **unused: Any) -> None:
            raise DQError(
                "dq quantizes diffusion denoisers (unet / transformer), not transformers text encoders; "
                "pass components_to_quantize=['transformer'] (or ['unet']) to PipelineQuantizationConfig."
            )

    return DQTransformersConfig


def register_backend() -> None:
    """Insert dq into diffusers' and transformers' auto quantization mappings, as sdnq does."""
    diffusers_auto.AUTO_QUANTIZER_MAPPING["dq"] = DQQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dq"] = DQConfig
    from transformers.quantizers import auto as transformers_auto

    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault("dq", _transformers_config_class())
