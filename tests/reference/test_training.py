"""Each training script runs a few steps end to end into a temp dir, and its output loads."""

import torch

from dq.reference import train_clip, train_pixart, train_sd, train_vae, train_video

TINY = ["--steps", "1", "--samples", "8", "--batch-size", "2", "--threads", "1"]


def test_image_training_scripts(tmp_path):
    from diffusers import PixArtSigmaPipeline, StableDiffusionPipeline

    train_vae.main(TINY + ["--out", str(tmp_path / "vae")])
    train_sd.main(TINY + ["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "sd")])
    train_pixart.main(TINY + ["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "px")])
    assert (tmp_path / "sd" / "training.json").exists()
    StableDiffusionPipeline.from_pretrained(tmp_path / "sd", dtype=torch.float32)
    PixArtSigmaPipeline.from_pretrained(tmp_path / "px", dtype=torch.float32)


def test_video_training_scripts(tmp_path):
    from diffusers import WanPipeline

    train_vae.main(TINY + ["--video", "--out", str(tmp_path / "vae")])
    train_video.main(TINY + ["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "wan")])
    WanPipeline.from_pretrained(tmp_path / "wan", dtype=torch.float32)


def test_clip_training_script(tmp_path):
    train_clip.main(TINY + ["--out", str(tmp_path / "clip")])
    assert (tmp_path / "clip" / "open_clip_model.safetensors").exists()
