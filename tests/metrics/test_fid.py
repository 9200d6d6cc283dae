import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from torch import nn

from dq.errors import DQError
from dq.metrics import FID, METRICS, resolve_inception_weights


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception state dict saved to a local file."""
    patch = pytest.MonkeyPatch()
    # torch-fidelity downloads its weights in __init__; build the architecture from an empty state dict instead.
    patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    patch.setattr(nn.Module, "load_state_dict", lambda self, state_dict, strict=True: None)
    try:
        torch.manual_seed(0)
        model = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_clip_backbone_identical_sets_near_zero_noised_sets_far(images, add_noise, tiny_clip):
    same, noised = FID(tiny_clip), FID(tiny_clip)
    for batch in (images[:4], images[4:]):
        same.update(batch, reference=batch)
        noised.update(add_noise(batch, 0.3), reference=batch)
    identical, different = same.compute()["value"], noised.compute()["value"]
    assert abs(identical) < 1e-3
    assert different > 100 * max(abs(identical), 1e-3)


def test_clip_backbone_settings_record_resize(tiny_clip):
    name, weights = tiny_clip
    settings = FID(name, weights_path=weights, antialias=False).settings()
    assert settings["backbone"] == f"open_clip:{name}:{weights}"
    assert settings["resize"] == [32, 32] and settings["antialias"] is False
    assert settings["num_features"] == 16


def test_open_clip_object_backbone(images, tiny_clip):
    name, weights = tiny_clip
    model = open_clip.create_model(name, pretrained=str(weights))
    fid = METRICS.get("fid")(model)
    fid.update(images, reference=images)
    assert abs(fid.compute()["value"]) < 1e-3


def test_inception_loads_local_weights(images, inception_weights):
    fid = FID(weights_path=inception_weights, antialias=False)
    expected = torch.load(inception_weights)["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(fid.metric.inception.Conv2d_1a_3x3.conv.weight, expected)
    assert fid.settings() == {
        "metric": "fid",
        "backbone": "inception-v3-compat",
        "weights": str(inception_weights),
        "num_features": 2048,
        "resize": [299, 299],
        "antialias": False,
    }
    # compute() on 2048-d features is a 2048x2048 eigendecomposition, too slow for a CPU unit test.
    fid.update(images[:2], reference=images[:2])
    assert fid.metric.fake_features_num_samples == 2
    assert torch.isfinite(fid.metric.fake_features_sum).all() and fid.metric.fake_features_sum.abs().sum() > 0


def test_missing_inception_weights_name_the_flag():
    with pytest.raises(DQError, match="--fid-weights PATH"):
        FID()
    with pytest.raises(DQError, match="--fid-weights"):
        resolve_inception_weights("/nonexistent/inception.pth")


def test_inception_weights_found_in_torch_hub_cache(inception_weights):
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fidelity_inception.URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    shutil.copy(inception_weights, cached)
    assert resolve_inception_weights() == str(cached)


def test_clip_backbone_without_weights_is_an_error():
    with pytest.raises(DQError, match="without weights"):
        FID("ViT-B-32")


def test_fewer_than_two_images_report_a_reason(images, tiny_clip):
    name, weights = tiny_clip
    fid = FID(name, weights_path=weights)
    fid.update(images[:1], reference=images[:1])
    assert fid.compute()["value"] is None
