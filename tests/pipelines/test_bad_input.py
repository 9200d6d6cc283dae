"""Bad input gets a DQError that says what was wrong; nothing is half-done."""

import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

import dq
from dq.recipes import Recipe, load_recipe
from tiny_pipelines import build, run


def test_pipeline_without_denoiser():
    class TextOnlyPipeline:
        text_encoder = nn.Linear(4, 4)

    with pytest.raises(dq.DQError, match="TextOnlyPipeline"):
        dq.quantize(TextOnlyPipeline(), "w8a8")


def test_model_without_quantizable_layers_names_its_class():
    class Convless(nn.Module):
        config = {}

        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

    with pytest.raises(dq.DQError, match="Convless has no layer"):
        dq.quantize(Convless(), "w8a8")


def test_unknown_recipe_lists_available():
    with pytest.raises(dq.DQError, match=r"unknown recipe 'w3a3'.*w4a16.*w8a8"):
        dq.quantize(build("pixart")[0], "w3a3")


def test_recipe_yaml_unknown_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nweight: {format: int8}\nbits: 4\n")
    with pytest.raises(dq.DQError, match=r"unknown field\(s\) \['bits'\]"):
        load_recipe(path)


def test_recipe_yaml_ill_typed_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nweight: {format: int8}\nskip: proj_out\n")
    with pytest.raises(dq.DQError, match="field 'skip' must be list"):
        load_recipe(path)


def test_recipe_unknown_quantizer_field():
    with pytest.raises(dq.DQError, match="bitz"):
        Recipe.from_dict({"name": "x", "weight": {"format": "int8", "bitz": 3}})


def test_no_double_quantization():
    pipe, _ = build("pixart")
    dq.quantize(pipe, "w8a8")
    with pytest.raises(dq.DQError, match="already quantized"):
        dq.quantize(pipe, "w4a16")


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    pipe, _ = build("pixart")
    dq.quantize(pipe, "w4a16")
    directory = tmp_path_factory.mktemp("pixart-w4a16")
    pipe.transformer.save_pretrained(directory)
    return directory


def _tamper(directory, tmp_path, edit):
    target = tmp_path / "tampered"
    target.mkdir()
    (target / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"))
    return target


def _first_qweight(tensors):
    return next(k for k in tensors if k.endswith(".qweight"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(_first_qweight(t)), r"missing .*\.qweight"),
        (lambda t: t.__setitem__(_first_qweight(t).replace("qweight", "extra"), torch.zeros(2)), r"unexpected .*\.extra"),
        (lambda t: t.__setitem__(_first_qweight(t), t[_first_qweight(t)][:, :-1].contiguous()), r"\.qweight: expected \[\d+, \d+\] torch.uint8, found"),
        (lambda t: t.__setitem__(_first_qweight(t), t[_first_qweight(t)].to(torch.int32)), r"qweight: .*found .*torch.int32"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_checkpoint_not_matching_config(saved_transformer, tmp_path, edit, message):
    target = _tamper(saved_transformer, tmp_path, edit)
    with pytest.raises(dq.DQError, match=message):
        PixArtTransformer2DModel.from_pretrained(target)


def test_config_naming_missing_module(saved_transformer, tmp_path):
    target = _tamper(saved_transformer, tmp_path, lambda t: None)
    config = json.loads((target / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules["no_such.layer"] = next(iter(modules.values()))
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(dq.DQError, match="no_such"):
        PixArtTransformer2DModel.from_pretrained(target)


def test_quantize_at_load_time_with_config(tmp_path):
    """`from_pretrained(..., quantization_config=dq.DQConfig("w4a16"))` quantizes data-free at load; saves and reloads."""
    pipe, kwargs = build("pixart")
    pipe.transformer.save_pretrained(tmp_path / "fp")
    model = PixArtTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=dq.DQConfig("w4a16"))
    assert model.is_quantized and len(model.config.quantization_config.modules) > 0
    model.save_pretrained(tmp_path / "q")
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "q")
    pipe.transformer = model
    out = run(pipe, kwargs)
    pipe.transformer = reloaded
    assert torch.equal(run(pipe, kwargs), out)


def test_load_time_config_refuses_calibrated_recipe(tmp_path):
    pipe, _ = build("pixart")
    pipe.transformer.save_pretrained(tmp_path / "fp")
    recipe = {**load_recipe("w8a8").to_dict(), "name": "needs-data", "method": "timestep"}
    with pytest.raises(dq.DQError, match="calibrates on data"):
        PixArtTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=dq.DQConfig(recipe))


def test_checkpoint_written_with_needs_data_in_its_recipe_still_loads(saved_transformer, tmp_path):
    """Checkpoints from before needs_data became the method's carry it in quantization_config.recipe."""
    legacy = _tamper(saved_transformer, tmp_path, lambda tensors: None)
    config = json.loads((legacy / "config.json").read_text())
    config["quantization_config"]["recipe"]["needs_data"] = False
    (legacy / "config.json").write_text(json.dumps(config))
    old = PixArtTransformer2DModel.from_pretrained(legacy)
    new = PixArtTransformer2DModel.from_pretrained(saved_transformer)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_recipe_needs_data_is_the_methods():
    """needs_data follows from the method; a checkpoint's legacy field is accepted only when it agrees."""
    legacy = {**load_recipe("w8a8").to_dict(), "needs_data": False}
    assert not dq.Recipe.from_dict(legacy).needs_data
    with pytest.raises(dq.DQError, match="needs_data=True contradicts method 'rtn'"):
        dq.Recipe.from_dict({**legacy, "needs_data": True})


def test_pipeline_quantization_config_backend(tmp_path):
    """diffusers' PipelineQuantizationConfig(quant_backend="dq") quantizes the denoiser while loading."""
    from diffusers import PipelineQuantizationConfig

    from diffusers import PixArtSigmaPipeline

    build("pixart")[0].save_pretrained(tmp_path / "fp")
    config = PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"recipe": "w4a16"}, components_to_quantize=["transformer"])
    pipe = PixArtSigmaPipeline.from_pretrained(tmp_path / "fp", quantization_config=config, tokenizer=None, text_encoder=None)
    assert pipe.transformer.is_quantized
    with pytest.raises(dq.DQError, match="components_to_quantize"):
        PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"recipe": "w4a16"})._resolve_quant_config(is_diffusers=False, module_name="text_encoder")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reload_with_dtype_keeps_packed_tensors_exact(saved_transformer, dtype):
    """from_pretrained(dtype=...) casts float tensors; dq's scales must still load bit-exactly."""
    reference = PixArtTransformer2DModel.from_pretrained(saved_transformer)
    model = PixArtTransformer2DModel.from_pretrained(saved_transformer, dtype=dtype)
    ref_sd, sd = reference.state_dict(), model.state_dict()
    scales = [k for k in sd if k.endswith("weight_scale")]
    assert scales and all(sd[k].dtype == torch.float16 and torch.equal(sd[k], ref_sd[k]) for k in scales)
