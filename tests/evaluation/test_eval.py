"""dq eval end to end on a tiny pipeline: images, metrics, report, resume, configuration guard, video."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dq.errors import DQError
from dq.evaluation import EvalConfig, ScoringConfig, evaluate
from dq.evaluation import generation, rundir


def _config(model: Path, out: Path, prompts: Path, clip_dir: Path, **overrides) -> EvalConfig:
    scoring = overrides.pop("scoring", ScoringConfig(
        metrics=["fid", "clip", "psnr", "ssim"], fid_backbone="clip", clip_model=f"local-dir:{clip_dir}",
    ))
    kwargs = dict(model=str(model), out=out, variants="fp,w8a8", prompts=str(prompts), n=4, steps=2, batch_size=2,
                  scoring=scoring)
    kwargs.update(overrides)
    return EvalConfig(**kwargs)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """mtime (ns) and content of every image and perf record of a run."""
    files = [p for sub in ("images", "perf") for p in (root / sub).rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if any variant pipeline is built (i.e. generation starts)."""

    def refuse(self, variant):
        raise AssertionError(f"generation started for {variant.name}")

    monkeypatch.setattr(generation.VariantBuilder, "build", refuse)


def test_eval_writes_paired_images_metrics_and_report(tiny_sd, tiny_clip_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    results = evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, variants="w8a8,w4a16"))

    assert list(results["variants"]) == ["fp", "w8a8", "w4a16"]  # FP added, first
    for variant in results["variants"]:
        paths = sorted((out / "images" / variant).glob("*.png"))
        assert [p.name for p in paths] == ["00000_0.png", "00001_1.png", "00002_2.png", "00003_3.png"]
        assert np.asarray(Image.open(paths[0])).shape == (16, 16, 3)
    fp, w8a8, w4a16 = (results["variants"][v] for v in ("fp", "w8a8", "w4a16"))
    # FP is only scored against its prompts; each quantized variant against FP, image by image.
    assert set(fp["metrics"]) == {"clip"} and set(w8a8["metrics"]) == {"fid", "clip", "psnr", "ssim"}
    for entry in (w8a8, w4a16):
        assert entry["metrics"]["psnr"]["ids"] == [0, 1, 2, 3]
        assert 20 < entry["metrics"]["psnr"]["value"] < math.inf
        assert 0 < entry["metrics"]["ssim"]["value"] < 1
        assert entry["metrics"]["fid"]["value"] >= 0
        assert entry["weight_bytes_ratio"] < 0.5  # packed int8 / int4 weights
        assert entry["perf"]["latency_ratio"] > 0 and entry["perf"]["timed_images"] == 4
    # int8 weights and activations stay closer to FP than int4 weights.
    assert w8a8["metrics"]["psnr"]["value"] > w4a16["metrics"]["psnr"]["value"]
    # PSNR recomputed from the PNGs on disk matches the reported per-image value.
    a = np.asarray(Image.open(out / "images/fp/00001_1.png"), dtype=np.float64) / 255
    b = np.asarray(Image.open(out / "images/w8a8/00001_1.png"), dtype=np.float64) / 255
    assert w8a8["metrics"]["psnr"]["per_image"][1] == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)), rel=1e-5)
    assert w8a8["delta_vs_fp"]["clip"] == pytest.approx(w8a8["metrics"]["clip"]["value"] - fp["metrics"]["clip"]["value"])
    assert results["metric_settings"]["fid"]["antialias"] is True and results["metric_settings"]["fid"]["resize"]
    assert json.loads((out / "results.json").read_text())["variants"]["w8a8"]["metrics"]["psnr"] == w8a8["metrics"]["psnr"]
    report = (out / "report.md").read_text()
    assert "| `w8a8` |" in report and "latency x FP" in report
    assert Image.open(out / "grid.png").size[0] > 3 * 128 and (out / "quality_vs_speed.png").is_file()


def test_resume_regenerates_nothing_and_refills_only_what_is_missing(
    tiny_sd, tiny_clip_dir, prompt_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = _config(tiny_sd, out, prompt_file, tiny_clip_dir)
    first = evaluate(cfg)
    before = _snapshot(out)

    builds = []
    real_build = generation.VariantBuilder.build
    monkeypatch.setattr(generation.VariantBuilder, "build", lambda self, v: builds.append(v.name) or real_build(self, v))
    again = evaluate(cfg)
    assert builds == [] and _snapshot(out) == before  # nothing loaded, no file touched
    assert again["variants"]["w8a8"]["metrics"] == first["variants"]["w8a8"]["metrics"]
    assert again["variants"]["w8a8"]["perf"] == first["variants"]["w8a8"]["perf"]  # timing kept from the first run

    # Lose one image: only its batch's variant is rebuilt and only that file is written, identical to before.
    lost = out / "images/w8a8/00003_3.png"
    lost.unlink()
    evaluate(cfg)
    assert builds == ["w8a8"]
    after = _snapshot(out)
    remade = ("images/w8a8/00003_3.png", "perf/w8a8/00001.json")
    for name, (mtime, data) in before.items():
        if name not in remade:
            assert after[name] == (mtime, data), name
    assert after[remade[0]][1] == before[remade[0]][1]  # seeded generation is reproducible
    assert after[remade[1]][0] > before[remade[1]][0]  # the remade batch was timed again


def test_interrupted_run_keeps_finished_images_and_leaves_no_partial_files(
    tiny_sd, tiny_clip_dir, prompt_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = _config(tiny_sd, out, prompt_file, tiny_clip_dir, scoring=ScoringConfig(metrics=["psnr"]))
    real_write = rundir.write_png
    calls = []

    def write_then_die(path, pixels):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the third image was being written
        real_write(path, pixels)

    monkeypatch.setattr(generation, "write_png", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    files = sorted(p.name for p in (out / "images/fp").iterdir())
    assert files == ["00000_0.png", "00001_1.png"]  # finished images kept, no temporary leftovers
    kept = {p: p.stat().st_mtime_ns for p in (out / "images/fp").iterdir()}

    monkeypatch.setattr(generation, "write_png", real_write)
    results = evaluate(cfg)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(list((out / "images/fp").iterdir())) == 4 and results["variants"]["w8a8"]["metrics"]["psnr"]["value"] > 0


def test_changed_configuration_is_refused_unless_overwrite(tiny_sd, tiny_clip_dir, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, scoring=ScoringConfig(metrics=["psnr"])))
    old_image = (out / "images/fp/00000_0.png").read_bytes()

    def refuse(self, variant):
        raise AssertionError("generation started")

    with monkeypatch.context() as patch:
        patch.setattr(generation.VariantBuilder, "build", refuse)
        with pytest.raises(DQError, match=r"steps: 2 -> 3[\s\S]*--overwrite"):
            evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, steps=3, scoring=ScoringConfig(metrics=["psnr"])))
        with pytest.raises(DQError, match="variants"):
            evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, variants="fp,w4a16", scoring=ScoringConfig(metrics=["psnr"])))
        # Scoring settings do not change the images: a new metric re-scores the existing run.
        rescored = evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, scoring=ScoringConfig(metrics=["psnr", "ssim"])))
        assert set(rescored["variants"]["w8a8"]["metrics"]) == {"psnr", "ssim"}

    results = evaluate(_config(tiny_sd, out, prompt_file, tiny_clip_dir, steps=3, overwrite=True,
                               scoring=ScoringConfig(metrics=["psnr"])))
    assert results["config"]["steps"] == 3
    assert (out / "images/fp/00000_0.png").read_bytes() != old_image


def test_video_pipeline_writes_frames_and_per_frame_metrics(tiny_wan, prompt_file, tmp_path):
    out = tmp_path / "run"
    results = evaluate(EvalConfig(
        model=str(tiny_wan), out=out, variants="fp,w8a8", prompts=str(prompt_file), n=2, steps=2, batch_size=2,
        height=16, width=16, num_frames=5, scoring=ScoringConfig(metrics=["psnr", "ssim"]),
    ))
    frames = sorted(p.name for p in (out / "images/w8a8/00001_1").iterdir())
    assert len(frames) >= 5 and frames == [f"{f:04d}.png" for f in range(len(frames))]
    assert np.asarray(Image.open(out / "images/w8a8/00001_1/0000.png")).shape == (16, 16, 3)
    psnr = results["variants"]["w8a8"]["metrics"]["psnr"]
    assert psnr["ids"] == list(range(2 * len(frames)))  # one score per frame of each clip
    assert 0 < psnr["value"] < math.inf
    assert (out / "grid.png").is_file()
