"""Tiny diffusers pipelines of the five denoiser families, built from configs (no downloads).

Text encoders are left out: each pipeline is called with precomputed prompt embeddings, so the whole
denoising loop and VAE decode run without a tokenizer.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    DDIMScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)

FAMILIES = ("sd", "pixart", "sd3", "flux", "wan")


def _vae(latent_channels: int = 4) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build(family: str, seed: int = 0):
    """A tiny pipeline of `family` and the keyword arguments that run it (2 steps, latent output)."""
    torch.manual_seed(seed)
    if family == "sd":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        emb = torch.randn(1, 7, 64)
        kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=32, width=32)
    elif family == "pixart":
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4,
            in_channels=4, out_channels=8, cross_attention_dim=64, caption_channels=32,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False,
        )
        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
        emb = torch.randn(1, 6, 32)
        kwargs = dict(
            prompt_embeds=emb, prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
            negative_prompt_embeds=torch.zeros_like(emb), negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
            negative_prompt=None, height=32, width=32, use_resolution_binning=False,
        )
    elif family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=16,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        kwargs = dict(
            prompt_embeds=torch.randn(1, 6, 32), negative_prompt_embeds=torch.randn(1, 6, 32),
            pooled_prompt_embeds=torch.randn(1, 32), negative_pooled_prompt_embeds=torch.randn(1, 32), height=32, width=32,
        )
    elif family == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        )
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(latent_channels=4), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )
        kwargs = dict(prompt_embeds=torch.randn(1, 6, 32), pooled_prompt_embeds=torch.randn(1, 32), height=32, width=32)
    elif family == "wan":
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False])
        pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler())
        kwargs = dict(prompt_embeds=torch.randn(1, 6, 32), negative_prompt_embeds=torch.randn(1, 6, 32), height=16, width=16, num_frames=5)
    else:
        raise ValueError(family)
    kwargs.update(num_inference_steps=2, output_type="latent")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them
    return pipe, kwargs


def run(pipe, kwargs, seed: int = 0) -> torch.Tensor:
    """Run the pipeline deterministically and return its output latents."""
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    return (out.images if hasattr(out, "images") else out.frames).detach()



def load(directory: str):
    """Reload a saved tiny pipeline the way `dq` commands do (components saved as None stay None)."""
    from dq.pipelines.loading import load_pipeline

    return load_pipeline(str(directory))
