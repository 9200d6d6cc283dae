"""Configs of the reference models: stock diffusers/transformers classes, sized for 32x32 on a CPU."""

from __future__ import annotations

import torch

from .tokenization import CLIP_CONTEXT_LENGTH, clip_vocab, t5_tokenizer

TEXT_DIM = 64


class _Seed:
    """Context manager: fork the CPU RNG and seed it, so model init is reproducible."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def clip_text_encoder(seed: int = 0):
    """Frozen random-init ``CLIPTextModel`` (the denoiser learns to read it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(clip_vocab()),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        bos_token_id=clip_vocab()["<|startoftext|>"],
        eos_token_id=clip_vocab()["<|endoftext|>"],
        pad_token_id=clip_vocab()["<|endoftext|>"],
    )
    with _Seed(seed):
        return CLIPTextModel(config).eval().requires_grad_(False)


def t5_text_encoder(seed: int = 0, umt5: bool = False):
    """Frozen random-init ``T5EncoderModel`` (or ``UMT5EncoderModel`` for Wan)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=len(t5_tokenizer()),
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=2 * TEXT_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    with _Seed(seed):
        return model_cls(config_cls(**kwargs)).eval().requires_grad_(False)


def image_vae(seed: int = 0):
    """``AutoencoderKL`` with 4x downsampling: 32x32x3 images <-> 8x8x4 latents."""
    from diffusers import AutoencoderKL

    with _Seed(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
        )


def video_vae(seed: int = 0):
    """``AutoencoderKLWan`` with 4x spatial, 2x temporal compression: 9x32x32 -> 5x8x8x4."""
    from diffusers import AutoencoderKLWan

    with _Seed(seed):
        return AutoencoderKLWan(
            base_dim=16,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
            scale_factor_temporal=2,
            scale_factor_spatial=4,
        )


def sd_unet(seed: int = 0):
    """SD1.5-shaped ``UNet2DConditionModel``: 3 levels, 2 layers per block, cross-attention."""
    from diffusers import UNet2DConditionModel

    with _Seed(seed):
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=16,
        )


def pixart_transformer(seed: int = 0):
    """``PixArtTransformer2DModel``: 6 blocks, adaLN-single, cross-attention, patch 1 on 8x8 latents."""
    from diffusers import PixArtTransformer2DModel

    with _Seed(seed):
        return PixArtTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            cross_attention_dim=128,
            norm_num_groups=32,
            sample_size=8,
            patch_size=1,
            caption_channels=TEXT_DIM,
            interpolation_scale=1,
        )


def wan_transformer(seed: int = 0):
    """``WanTransformer3DModel``: 6 blocks, patch (1, 2, 2) over 5x8x8x4 latents."""
    from diffusers import WanTransformer3DModel

    with _Seed(seed):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=4,
            out_channels=4,
            text_dim=TEXT_DIM,
            freq_dim=64,
            ffn_dim=256,
            num_layers=6,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
