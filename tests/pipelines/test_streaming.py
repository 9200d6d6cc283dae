"""Streaming quantization of checkpoints on disk: equal to in-memory dq.quantize, loadable with from_pretrained."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from tiny_pipelines import build, run

import dq
from dq.pipelines.streaming import INDEX_NAME, WORK_SUFFIX, ShardWriter, stream_quantize


@pytest.fixture(scope="module")
def pixart_bf16(tmp_path_factory):
    """A tiny PixArt transformer saved in BF16, in several safetensors shards."""
    pipe, kwargs = build("pixart")
    directory = tmp_path_factory.mktemp("pixart-bf16")
    pipe.transformer.to(torch.bfloat16).save_pretrained(directory, max_shard_size="200KB")
    assert (directory / INDEX_NAME).is_file()
    return directory


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8", "w4a4"])
def test_streamed_equals_in_memory(pixart_bf16, tmp_path, recipe):
    report = stream_quantize(pixart_bf16, recipe, tmp_path / "q", shard_bytes=64 * 1024)
    assert report.quantized > 0 and report.bytes_out < report.bytes_in
    assert len(json.loads((tmp_path / "q" / INDEX_NAME).read_text())["weight_map"]) > 0
    streamed = PixArtTransformer2DModel.from_pretrained(tmp_path / "q")
    in_memory = PixArtTransformer2DModel.from_pretrained(pixart_bf16)
    dq.quantize(in_memory, recipe)
    assert streamed.is_quantized
    streamed_sd, memory_sd = streamed.state_dict(), in_memory.state_dict()
    assert set(streamed_sd) == set(memory_sd)
    assert all(torch.equal(streamed_sd[k], memory_sd[k].to(streamed_sd[k].dtype)) for k in memory_sd)
    assert streamed.config.quantization_config.modules == in_memory.config.quantization_config.modules


def test_pipeline_directory_copies_the_other_components(tmp_path):
    pipe, kwargs = build("sd")
    pipe.save_pretrained(tmp_path / "fp")
    stream_quantize(tmp_path / "fp", "w8a8", tmp_path / "q")
    assert (tmp_path / "q" / "model_index.json").read_text() == (tmp_path / "fp" / "model_index.json").read_text()
    assert (tmp_path / "q" / "vae" / "config.json").is_file()
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "q", text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)
    dq.quantize(pipe, "w8a8")
    assert torch.equal(run(reloaded, kwargs), run(pipe, kwargs))


def test_bad_input_is_refused_and_writes_nothing(pixart_bf16, tmp_path):
    with pytest.raises(dq.DQError, match="calibrates on data"):
        stream_quantize(pixart_bf16, "svdquant-w4a4", tmp_path / "a")
    with pytest.raises(dq.DQError, match="neither a diffusers pipeline directory"):
        stream_quantize(tmp_path, "w4a16", tmp_path / "b")
    (tmp_path / "exists").mkdir()
    with pytest.raises(dq.DQError, match="already exists"):
        stream_quantize(pixart_bf16, "w4a16", tmp_path / "exists")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_streams_a_local_directory(pixart_bf16, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dq", "quantize", str(pixart_bf16), "--recipe", "w4a16", "--out", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "streamed" in proc.stdout and "peak RSS" in proc.stdout
    assert PixArtTransformer2DModel.from_pretrained(tmp_path / "q").is_quantized


def test_unet_streams_too(tmp_path):
    pipe, _ = build("sd")
    pipe.unet.save_pretrained(tmp_path / "fp")
    stream_quantize(tmp_path / "fp", "w4a8", tmp_path / "q")
    streamed = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    dq.quantize(pipe.unet, "w4a8")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.equal(streamed(x, t, encoder_hidden_states=c).sample, pipe.unet(x, t, encoder_hidden_states=c).sample)


def test_an_interrupted_stream_resumes_after_its_last_written_shard(pixart_bf16, tmp_path, monkeypatch):
    whole = stream_quantize(pixart_bf16, "w4a8", tmp_path / "whole", shard_bytes=64 * 1024)
    real = ShardWriter.flush

    def crash_after_two_shards(self):
        real(self)
        if len(self.files) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "flush", crash_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        stream_quantize(pixart_bf16, "w4a8", tmp_path / "q", shard_bytes=64 * 1024)
    assert not (tmp_path / "q").exists() and (tmp_path / ("q" + WORK_SUFFIX) / "job.json").is_file()
    monkeypatch.setattr(ShardWriter, "flush", real)
    with pytest.raises(dq.DQError, match="different settings"):
        stream_quantize(pixart_bf16, "w4a16", tmp_path / "q", shard_bytes=64 * 1024)
    resumed = stream_quantize(pixart_bf16, "w4a8", tmp_path / "q", shard_bytes=64 * 1024)
    assert 0 < resumed.quantized < whole.quantized and not (tmp_path / ("q" + WORK_SUFFIX)).exists()
    a, b = (PixArtTransformer2DModel.from_pretrained(tmp_path / d).state_dict() for d in ("q", "whole"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
