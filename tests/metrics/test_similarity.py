import math

import pytest
import torch
import torchvision

from dq.errors import DQError
from dq.metrics import LPIPS, METRICS, PSNR, SSIM
from dq.metrics.similarity import lpips_backbone_filename


def test_identical_images_give_inf_psnr_and_unit_ssim(images):
    psnr, ssim = PSNR(), SSIM()
    psnr.update(images, reference=images)
    ssim.update(images, reference=images)
    assert psnr.compute()["value"] == math.inf
    assert ssim.compute()["value"] == pytest.approx(1.0, abs=1e-6)


def test_noise_lowers_psnr_and_ssim(images, add_noise):
    results = {}
    for std in (0.02, 0.1):
        psnr, ssim = PSNR(), SSIM()
        psnr.update(add_noise(images, std), reference=images)
        ssim.update(add_noise(images, std), reference=images)
        results[std] = psnr.compute(), ssim.compute()
    (psnr_low, ssim_low), (psnr_high, ssim_high) = results[0.02], results[0.1]
    assert 25 < psnr_low["value"] < 40 and psnr_high["value"] < psnr_low["value"] - 10
    assert ssim_high["value"] < ssim_low["value"] < 1
    assert len(psnr_low["per_image"]) == len(images)


def test_per_image_scores_follow_ids(images, add_noise):
    psnr = PSNR()
    noisy = add_noise(images, 0.05)
    psnr.update(noisy[4:], reference=images[4:], ids=range(4, 8))
    psnr.update(noisy[:4], reference=images[:4], ids=range(4))
    result = psnr.compute()
    assert result["ids"] == list(range(8))
    reference = PSNR()
    reference.update(noisy, reference=images)
    assert result["per_image"] == pytest.approx(reference.compute()["per_image"])


def test_mismatched_reference_names_both_shapes(images):
    with pytest.raises(DQError, match=r"\(8, 3, 32, 32\).*\(8, 3, 16, 16\)"):
        PSNR().update(images, reference=images[..., :16, :16])


def test_lpips_without_local_weights_reports_unavailable(images, caplog):
    metric = METRICS.get("lpips")()
    metric.update(images, reference=images)
    result = metric.compute()
    assert result["value"] is None
    assert lpips_backbone_filename("alex") in result["reason"] and "--lpips-weights" in result["reason"]
    assert "skipping LPIPS" in caplog.text


def test_lpips_missing_explicit_file_raises(tmp_path):
    with pytest.raises(DQError, match="--lpips-weights"):
        LPIPS(weights_path=tmp_path / "missing.pth")


def test_lpips_loads_backbone_from_local_file(images, tmp_path, add_noise):
    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    metric = LPIPS("alex", weights_path=path)
    loaded = metric.lpips.net.net.slice1[0].weight
    assert torch.equal(loaded, torch.load(path)["features.0.weight"])
    metric.update(images, reference=images)
    metric.update(add_noise(images, 0.1), reference=images)
    per_image = metric.compute()["per_image"]
    assert max(per_image[:8]) < 1e-6 < min(per_image[8:])
    assert metric.settings()["weights"] == str(path)
