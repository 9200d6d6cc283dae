import json

import open_clip
import pytest
import torch

TINY_CLIP = "dq-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """No test sees (or fills) a real weights cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """``(name, weights file)`` of a tiny random open_clip model registered with open_clip and saved locally."""
    root = tmp_path_factory.mktemp("open_clip")
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = root / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return TINY_CLIP, path


@pytest.fixture
def images():
    """Eight smooth 32x32 uint8 images: colour gradients that differ per image."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32)
    base = ramp.view(1, 1, 1, 32) * ramp.view(1, 1, 32, 1)
    colours = torch.rand(8, 3, 1, 1, generator=generator)
    offsets = torch.rand(8, 3, 1, 1, generator=generator) * 0.3
    return ((colours * base + offsets).clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture
def add_noise():
    """Gaussian noise of ``std`` (in [0, 1] units) added to uint8 images, seeded."""

    def noisy(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator) * std * 255
        return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)

    return noisy
