"""Fixtures for the eval tests: a tiny text-to-image pipeline and a tiny open_clip model, both saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = [
    "a small red circle in the center on a black background",
    "a large blue square at the top left on a white background",
    "a small green triangle at the bottom right on a gray background",
    "a large yellow circle at the top right on a brown background",
]


@pytest.fixture(autouse=True)
def offline_torch_home(tmp_path, monkeypatch):
    """No test sees (or fills) a real weights cache (tests/conftest.py sets one CPU thread)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _tiny_sd(path: Path) -> Path:
    """A tiny StableDiffusionPipeline with a real (random) CLIP text encoder and tokenizer, saved to `path`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from dq.reference.components import clip_text_encoder
    from dq.reference.tokenization import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=clip_text_encoder(0), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Directory of a tiny SD pipeline that makes 16x16 images from text prompts."""
    return _tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """An open_clip ``local-dir:`` model directory (config + safetensors weights) of a tiny random CLIP."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip") / "tiny-clip"
    root.mkdir()
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{root}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    return root


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# evaluation prompts\n" + "\n".join(PROMPTS) + "\n\n")
    return path


def _tiny_wan(path: Path) -> Path:
    """A tiny WanPipeline (text-to-video) with a real (random) UMT5 encoder and tokenizer, saved to `path`."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from dq.reference.components import TEXT_DIM, t5_text_encoder
    from dq.reference.tokenization import t5_tokenizer

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=2, scale_factor_temporal=1,
    )
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=t5_text_encoder(0, umt5=True), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """Directory of a tiny Wan pipeline that makes short 16x16 clips from text prompts."""
    return _tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")
