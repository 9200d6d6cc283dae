"""Every denoiser family x every RTN recipe: quantize, run the full pipeline, save, reload in a fresh
process (plain diffusers from_pretrained after `import dq`), and get bit-identical output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dq
from tiny_pipelines import FAMILIES, build, run

RECIPES = ("w8a8", "w4a16", "w4a8", "w4a4", "w4a8-progressive")

RELOAD_SCRIPT = """
import sys, torch, dq
torch.set_num_threads({threads})  # the parent's count: same float reductions, same codes
sys.path.insert(0, {tests!r})
from tiny_pipelines import load, run
for directory in sys.argv[1:]:
    kwargs = torch.load(directory + "/inputs.pt", weights_only=False)
    pipe = load(directory)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert denoiser.is_quantized and denoiser.hf_quantizer.__class__.__name__ == "DQQuantizer"
    torch.save(run(pipe, kwargs), directory + "/reloaded.pt")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Quantize and save every (family, recipe); reload them all in one fresh process."""
    root = tmp_path_factory.mktemp("roundtrip")
    results = {}
    for family in FAMILIES:
        for recipe in RECIPES:
            pipe, kwargs = build(family)
            report = dq.quantize(pipe, recipe)
            out = run(pipe, kwargs)
            directory = root / f"{family}-{recipe}"
            pipe.save_pretrained(directory)
            torch.save(kwargs, directory / "inputs.pt")
            results[family, recipe] = (report, out, directory)
    script = RELOAD_SCRIPT.format(tests=str(Path(__file__).parents[1]), threads=torch.get_num_threads())
    dirs = [str(d) for _, _, d in results.values()]
    proc = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_reload_in_fresh_process_is_bit_identical(saved, family, recipe):
    report, out, directory = saved[family, recipe]
    assert report.quantized, "some layers must be quantized"
    assert torch.isfinite(out).all()
    denoiser_dir = directory / ("unet" if family == "sd" else "transformer")
    config = json.loads((denoiser_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dq"
    assert set(config["quantization_config"]["modules"]) == set(report.quantized)
    assert torch.equal(torch.load(directory / "reloaded.pt"), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a16_save_is_small(saved, family):
    """Quantized layers' saved bytes are at most 0.32x their FP16 bytes (skipped layers excluded)."""
    report, _, directory = saved[family, "w4a16"]
    denoiser_dir = directory / ("unet" if family == "sd" else "transformer")
    tensors = load_file(str(next(denoiser_dir.glob("*.safetensors"))))
    quantized_bytes = fp16_bytes = 0
    for name in report.quantized:
        qweight = tensors[f"{name}.qweight"]
        quantized_bytes += sum(t.numel() * t.element_size() for k, t in tensors.items() if k in (f"{name}.qweight", f"{name}.weight_scale"))
        fp16_bytes += qweight.numel() * 2 * 2  # two int4 codes per byte, two bytes per fp16 weight
    ratio = quantized_bytes / fp16_bytes
    print(f"{family}: w4a16 saved/fp16 = {ratio:.4f}")
    assert ratio <= 0.32


def test_quantization_changes_output_but_stays_close():
    pipe, kwargs = build("pixart")
    ref = run(pipe, kwargs)
    dq.quantize(pipe, "w8a8")
    out = run(pipe, kwargs)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.1
