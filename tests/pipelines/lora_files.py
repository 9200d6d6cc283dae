"""LoRA files as the community makes them: PEFT adapters saved with diffusers' save_lora_weights, and the same
factors under kohya sd-scripts and XLabs key names (written here the way those tools name keys, not by dq)."""

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

# Attention, feed-forward, the transformer's 1x1 proj_in/proj_out convs and the ResNet convs (LoCon).
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"]
SD_LINEAR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


def peft_lora(model: nn.Module, targets: list[str], rank: int = 4, seed: int = 0, strength: float = 1.0,
              use_dora: bool = False, prefix: str | None = "unet") -> dict[str, torch.Tensor]:
    """A trained-looking PEFT adapter on `model`'s targets (random A and B), as PEFT's state dict, its keys
    under `prefix` as a pipeline's load_lora_weights expects them (None: the model's own names)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    model = inject_adapter_in_model(config, copy.deepcopy(model), adapter_name="made")  # the caller's model stays as it is
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(strength / p.shape[0] ** 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    state_dict = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="made").items()}
    return state_dict if prefix is None else {f"{prefix}.{k}": v for k, v in state_dict.items()}


def save_sd_lora(pipe_cls: type, directory: Path, unet_state_dict: dict[str, torch.Tensor]) -> Path:
    """The file diffusers' `save_lora_weights` writes for a UNet adapter (keys under "unet.") with its LoRA
    config as metadata (so alpha survives, as diffusers' training scripts save it); returns the directory."""
    layers = {k.removeprefix("unet."): v for k, v in unet_state_dict.items()}
    rank = next(v for k, v in layers.items() if "lora_A" in k).shape[0]
    targets = sorted({k.rpartition(".lora_")[0] for k in layers})
    metadata = {"r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "use_dora": any("magnitude" in k for k in layers)}
    pipe_cls.save_lora_weights(directory, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    return directory


def kohya_sd(unet_state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same adapter under sd-scripts' names: lora_unet_<path with _>.lora_down/lora_up/alpha."""
    out = {}
    for key, value in unet_state_dict.items():
        module, _, factor = key.removeprefix("unet.").rpartition(".lora_")
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_flux(transformer: nn.Module, rank: int, seed: int = 0, strength: float = 0.3) -> dict[str, torch.Tensor]:
    """A FLUX LoRA in kohya's BFL layout: lora_unet_double_blocks_N_{img,txt}_attn_qkv / _proj, single blocks' linear2.

    (diffusers' converter splits single blocks' linear1 at FLUX.1's own widths, 3 x 3072 + 12288, so a tiny
    FLUX cannot carry that one.)"""
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {}
    for i in range(len(transformer.transformer_blocks)):
        shapes[f"double_blocks_{i}_img_attn_qkv"] = (dim, 3 * dim)
        shapes[f"double_blocks_{i}_img_attn_proj"] = (dim, dim)
        shapes[f"double_blocks_{i}_txt_attn_qkv"] = (dim, 3 * dim)
        shapes[f"double_blocks_{i}_txt_attn_proj"] = (dim, dim)
    for i in range(len(transformer.single_transformer_blocks)):
        shapes[f"single_blocks_{i}_linear2"] = (dim + mlp, dim)
    out = {}
    for name, (fan_in, fan_out) in shapes.items():
        out[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        out[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * strength / rank**0.5
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return out


def xlabs_flux(transformer: nn.Module, rank: int, seed: int = 0, strength: float = 0.6) -> dict[str, torch.Tensor]:
    """A FLUX LoRA in XLabs' layout: double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight."""
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        for part, fan_out in (("qkv_lora1", 3 * dim), ("qkv_lora2", 3 * dim), ("proj_lora1", dim), ("proj_lora2", dim)):
            key = f"double_blocks.{i}.processor.{part}"
            out[f"{key}.down.weight"] = torch.randn(rank, dim, generator=g) / dim**0.5
            out[f"{key}.up.weight"] = torch.randn(fan_out, rank, generator=g) * strength / rank**0.5
    return out
