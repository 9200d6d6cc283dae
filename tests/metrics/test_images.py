import pytest
import torch
from PIL import Image

from dq.errors import DQError
from dq.metrics.images import to_float, to_uint8


def test_pil_uint8_and_float_inputs_agree(images):
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    assert torch.equal(to_uint8(pil), images)
    assert torch.equal(to_uint8(list(images)), images)
    assert torch.equal(to_uint8(images.float() / 255), images)
    assert torch.allclose(to_float(pil), images.float() / 255)


def test_grayscale_pil_becomes_rgb():
    batch = to_uint8([Image.new("L", (8, 8), 100)])
    assert batch.shape == (1, 3, 8, 8) and batch.dtype == torch.uint8


def test_vae_range_is_rejected_with_the_fix():
    with pytest.raises(DQError, match=r"\(x \+ 1\) / 2"):
        to_float(torch.rand(2, 3, 8, 8) * 2 - 1)


def test_mixed_sizes_are_rejected():
    with pytest.raises(DQError, match="different sizes"):
        to_uint8([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 16))])
