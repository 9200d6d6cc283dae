"""build_metrics: every metric comes from one builder lookup; skips, errors, the shared CLIP and fid_real."""

from __future__ import annotations

import pytest
import torch

from dq.errors import DQError
from dq.evaluation import scoring
from dq.evaluation.eval_config import ScoringConfig
from dq.evaluation.scoring import BUILDERS, EVAL_METRICS, BuildContext, build_metrics, builder
from dq.metrics import FID, PSNR, SSIM

CPU = torch.device("cpu")


def test_every_eval_metric_has_a_builder_and_the_plain_ones_use_the_default():
    assert BUILDERS.names() == ["clip", "fid", "lpips"]
    ctx = BuildContext(ScoringConfig(), False, CPU)
    assert isinstance(builder("psnr").build(ctx), PSNR) and isinstance(builder("ssim").build(ctx), SSIM)
    assert all(builder(name) is not None for name in EVAL_METRICS)


def test_unknown_and_empty_metric_lists_are_refused():
    with pytest.raises(DQError, match=r"unknown metric\(s\) sharpness; available: fid, clip, psnr, ssim, lpips\."):
        build_metrics(ScoringConfig(metrics=["psnr", "sharpness"]), False, CPU)
    with pytest.raises(DQError, match="--metrics is empty"):
        build_metrics(ScoringConfig(metrics=[]), False, CPU)


def test_default_metrics_skip_what_has_no_weights():
    result = build_metrics(ScoringConfig(), False, CPU)
    assert list(result.metrics) == ["psnr", "ssim"] and result.real_fid is None
    assert set(result.skipped) == {"fid", "clip", "lpips"}
    assert "--clip-model" in result.skipped["clip"] and "--lpips-weights" in result.skipped["lpips"]
    assert result.settings == {"psnr": result.metrics["psnr"].settings(), "ssim": result.metrics["ssim"].settings()}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ScoringConfig(metrics=["clip"]), "--clip-model"),
        (ScoringConfig(metrics=["lpips"]), "--lpips-weights"),
        (ScoringConfig(lpips_weights="/no/such/lpips.pth"), "/no/such/lpips.pth"),  # configured: an error, not a skip
        (ScoringConfig(clip_model="local-dir:/no/such/clip"), "/no/such/clip"),
    ],
)
def test_asked_for_or_configured_metrics_raise(config, message):
    with pytest.raises(DQError, match=message):
        build_metrics(config, False, CPU)


def test_clip_is_resolved_once_shared_by_clip_and_fid_and_recorded(tiny_clip_dir, monkeypatch):
    calls = []
    real_resolve = scoring._resolve_clip
    monkeypatch.setattr(scoring, "_resolve_clip", lambda *a: calls.append(a) or real_resolve(*a))
    config = ScoringConfig(metrics=["fid", "clip"], fid_backbone="clip", clip_model=f"local-dir:{tiny_clip_dir}")
    result = build_metrics(config, True, CPU)
    assert len(calls) == 1
    assert isinstance(result.real_fid, FID) and result.real_fid is not result.metrics["fid"]
    label = result.settings["clip"]["backbone"]
    assert label == result.settings["fid"]["backbone"] and "tiny-clip" in label
    assert result.settings["clip"]["weights"] is None and result.settings["fid"]["weights"] is None
    assert result.settings["clip"]["metric"] == result.metrics["clip"].settings()["metric"]


def test_no_real_fid_outside_the_reference_domain(tiny_clip_dir):
    config = ScoringConfig(metrics=["fid"], fid_backbone="clip", clip_model=f"local-dir:{tiny_clip_dir}")
    assert build_metrics(config, False, CPU).real_fid is None
