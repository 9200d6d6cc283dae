"""Block-sequential calibration of a pipeline on disk: the block data flow, quality against in-memory
quantization, at most two float blocks resident, resume after an interruption, and refusals."""

import copy
import dataclasses

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import build, run

import dq
from dq.calib.data import FLOAT, WEIGHTS
from dq.calib.sequential import GLUE, BlockDenoiser, denoiser_blocks, mount, trace_block_flow
from dq.calib.state import quant_state
from dq.nn import quant_layers
from dq.pipelines import sequential
from dq.pipelines.sequential import sequential_quantize
from dq.pipelines.streaming import WORK_SUFFIX
from dq.recipes import load_recipe

FAST = {"iters": 4, "act_iters": 2, "recon_samples": 2, "batch_size": 2}


def _saved(family, directory):
    """A tiny pipeline saved to `directory`, the kwargs that run it, and a CalibConfig (prompt embeddings)."""
    pipe, kwargs = build(family)
    pipe.save_pretrained(directory)
    pipe_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_inference_steps", "output_type")}
    calib = dq.CalibConfig(prompts=["p"] * 2, steps=4, samples=2, batch_size=2, pipeline_kwargs=pipe_kwargs)
    return pipe, kwargs, calib


def _recipe(name):
    recipe = load_recipe(name)
    return dataclasses.replace(recipe, options={**recipe.options, **{k: v for k, v in FAST.items() if k in recipe.options}})


def _load(directory):
    return DiffusionPipeline.from_pretrained(directory, dtype=torch.float32, text_encoder=None, tokenizer=None)


def test_block_flow_follows_the_unet_skip_connections():
    unet = build("sd")[0].unet
    blocks = denoiser_blocks(unet)
    flow = trace_block_flow(blocks, lambda: unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 64)),
                            [unet.conv_out])
    assert flow.order == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert flow.sources["mid_block"] == ["down_blocks.2"]
    assert flow.sources["up_blocks.0"] == ["down_blocks.1", "down_blocks.2", "mid_block"]  # its skips, and h
    assert flow.sources["up_blocks.2"] == ["down_blocks.0", "up_blocks.1"]
    assert flow.sources[GLUE] == ["up_blocks.2"]
    assert flow.last_reader()["down_blocks.0"] == "up_blocks.2" and flow.last_reader()["up_blocks.2"] == GLUE


@pytest.mark.parametrize("family,recipe", [("pixart", "w4a8-timestep"), ("pixart", "svdquant-w4a4"), ("sd", "w4a8-qdiffusion"),
                                           ("pixart", "w8a8-ptq4dm"), ("pixart", "w4a8-tfmq")])
def test_block_sequential_is_as_close_to_fp_as_in_memory(tmp_path, family, recipe):
    pipe, kwargs, calib = _saved(family, tmp_path / "fp")
    recipe = _recipe(recipe)
    if recipe.method == "qdiffusion":  # reconstruction replays per unit: one decoder block (with split shortcuts) keeps it fast
        recipe = dataclasses.replace(recipe, only=("up_blocks.1.*",))
    report = sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    denoiser = lambda p: p.unet if family == "sd" else p.transformer  # noqa: E731
    assert sorted(s for s in report.stages if s.startswith("block ")) == sorted(f"block {b}" for b in denoiser_blocks(denoiser(pipe)))
    assert not (tmp_path / ("q" + WORK_SUFFIX)).exists()
    ref = run(pipe, kwargs)
    streamed = _load(tmp_path / "q")
    in_memory = _load(tmp_path / "fp")
    dq.quantize(in_memory, recipe, calib=calib)
    layers = {n: type(m) for n, m in quant_layers(denoiser(streamed))}
    assert layers == {n: type(m) for n, m in quant_layers(denoiser(in_memory))} and report.quantized == len(layers)
    if recipe.method == "qdiffusion":
        assert "QuantSplitConv2d" in {t.__name__ for t in layers.values()}
    error = {name: float((run(p, kwargs) - ref).norm() / ref.norm()) for name, p in (("seq", streamed), ("mem", in_memory))}
    assert 0 < error["seq"] < 1.25 * error["mem"], error


@pytest.mark.parametrize("family", ["pixart", "sd"])
@pytest.mark.parametrize("recipe,stored", [("w4a8-timestep", "act_quantizer.scale"), ("svdquant-w4a4", "smooth"), ("svdquant-w4a4", "qweight")])
def test_every_block_is_calibrated_on_the_inputs_the_whole_model_gives_it_in_memory(tmp_path, family, recipe, stored):
    """Range observers see the weight-quantized model with float activations, SVDQuant the float model (as
    dq.quantize replays them), not the quantized blocks before them; and every block's inputs are computed in
    the batches the calibrator replays in memory, so they are bitwise the whole model's: the activation
    scales, the smoothing vectors and the weight codes of every block equal the in-memory ones exactly."""
    _, _, calib = _saved(family, tmp_path / "fp")
    calib = dataclasses.replace(calib, prompts=["p", "q", "r"], samples=3)  # two replay batches of 2, one with two steps
    recipe = _recipe(recipe)
    sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    streamed = _load(tmp_path / "q")
    in_memory = _load(tmp_path / "fp")
    dq.quantize(in_memory, recipe, calib=calib)
    denoiser = lambda p: (p.unet if family == "sd" else p.transformer).state_dict()  # noqa: E731
    expected = {n: t for n, t in denoiser(in_memory).items() if n.endswith(stored)}
    second = "down_blocks.1." if family == "sd" else "transformer_blocks.1."
    assert sum(n.startswith(second) for n in expected) >= 2  # the second block's, after a quantized one
    differing = [n for n, t in expected.items() if not torch.equal(denoiser(streamed)[n], t)]
    assert not differing, differing


def test_reconstruction_learns_the_same_weights_block_by_block_as_in_memory(tmp_path):
    """AdaRound draws each unit's batches in an order keyed by the unit's name, which a block keeps inside its
    BlockDenoiser: reconstructing two blocks one at a time learns the codes the whole denoiser learns (a few
    codes may round the other way: the blocks' inputs differ in the last float bits)."""
    _, _, calib = _saved("sd", tmp_path / "fp")
    calib = dataclasses.replace(calib, prompts=["p", "q"], samples=2)
    recipe = load_recipe("w4a8-qdiffusion")
    recipe = dataclasses.replace(recipe, only=("down_blocks.1.*", "up_blocks.1.*"),
                                 options={**recipe.options, "iters": 8, "act_iters": 0, "recon_samples": 4, "batch_size": 1})
    sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    streamed = _load(tmp_path / "q").unet.state_dict()
    in_memory = _load(tmp_path / "fp")
    dq.quantize(in_memory, recipe, calib=calib)
    codes = {n: t for n, t in in_memory.unet.state_dict().items() if n.endswith("qweight")}
    assert any(n.startswith("down_blocks.1.") for n in codes) and any(n.startswith("up_blocks.1.") for n in codes)
    differing = sum(int((t != streamed[n]).sum()) for n, t in codes.items())
    assert differing <= 1e-3 * sum(t.numel() for t in codes.values()), differing


def test_streams_are_the_whole_models_block_inputs_in_their_quantization_states(tmp_path, monkeypatch):
    """Q-Diffusion and TFMQ replay each block's inputs in three states of the whole model, as in memory: the
    float stream is the float denoiser's input to the block; the weights stream is the calibrated denoiser's in
    simulation with activations in float (it reconstructs weights and observes activation ranges on it); the
    quantized stream, with both quantized, differs from both once a quantized block ran. TFMQ's temporal layers
    inside the blocks (the resnets' time_emb_proj) are calibrated first, as the prelude."""
    pipe, _, calib = _saved("sd", tmp_path / "fp")
    seen, calibrated = {}, {}

    def spy(denoiser, blocks, flow, name, data, *rest):
        whole = copy.deepcopy(denoiser)  # the glue, with the earlier blocks as calibrated (before packing)
        for block, module in calibrated.items():
            mount(whole, block, module)
        seen[name] = (data, whole, capture_block_inputs(denoiser, blocks, flow, name, data, *rest))
        return seen[name][2]

    def snapshot(model):
        if isinstance(model, BlockDenoiser):
            calibrated[model.block_name] = copy.deepcopy(model.get_submodule(model.block_name))
        deploy_all(model)

    capture_block_inputs, deploy_all = sequential.capture_block_inputs, sequential.deploy_all
    monkeypatch.setattr(sequential, "capture_block_inputs", spy)
    monkeypatch.setattr(sequential, "deploy_all", snapshot)
    recipe = load_recipe("w4a8-tfmq")
    recipe = dataclasses.replace(recipe, only=("up_blocks.1.*",), options={**recipe.options, **FAST, "tib_iters": 4})
    report = sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    assert "prelude" in report.stages
    assert "up_blocks.1.resnets.0.time_emb_proj" in dict(quant_layers(_load(tmp_path / "q").unet))
    hidden = lambda kw: kw["block_kwargs"].get("hidden_states", kw["block_args"][0] if kw["block_args"] else None)  # noqa: E731
    for name, (data, whole, block_data) in seen.items():
        for s, b in zip(data.samples, block_data.samples):
            args, kwargs = sequential._replay_inputs(*s.inputs())
            _, q, streams = b.all_inputs()
            for unet, weights, stream in ((pipe.unet, False, streams[FLOAT]), (whole, True, streams[WEIGHTS])):
                expected = _block_inputs(unet, name, args, kwargs, weights)
                for key, value in zip(("block_args", "block_kwargs"), expected):
                    torch.testing.assert_close(stream[key], value, rtol=1e-5, atol=1e-6)
            if name == "up_blocks.2":  # after the quantized up_blocks.1
                assert not torch.allclose(hidden(streams[WEIGHTS]), hidden(streams[FLOAT]), atol=1e-3)
                assert not torch.allclose(hidden(q), hidden(streams[WEIGHTS]), atol=1e-3)


def _block_inputs(unet, name, args, kwargs, weights):
    """The inputs of block `name` when `unet` runs with its weights quantized or not and its activations in float."""
    grabbed = {}

    def grab(module, a, k):
        grabbed["inputs"] = (a, k)
        raise StopIteration

    handle = unet.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), quant_state(unet, weights=weights, acts=False), pytest.raises(StopIteration):
            unet(*args, **kwargs)
    finally:
        handle.remove()
    return grabbed["inputs"]


def test_no_more_than_two_float_blocks_are_resident(tmp_path):
    _saved("pixart", tmp_path / "fp")
    seen, most = [], [0]

    def count(module, args):
        if type(module).__name__ == "BasicTransformerBlock":
            if all(module is not m for m in seen):
                seen.append(module)
            resident = sum(any(p.device.type != "meta" for p in m.parameters()) for m in seen)
            most[0] = max(most[0], resident)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        sequential_quantize(tmp_path / "fp", _recipe("w4a8-timestep"), tmp_path / "q", calib=_saved("pixart", tmp_path / "fp2")[2])
    finally:
        handle.remove()
    assert len(seen) == 2 and 1 <= most[0] <= 2


def test_an_interrupted_run_resumes_at_the_first_unfinished_block(tmp_path, monkeypatch):
    _, kwargs, calib = _saved("sd", tmp_path / "fp")
    recipe = _recipe("w4a8-timestep")
    sequential_quantize(tmp_path / "fp", recipe, tmp_path / "whole", calib=calib)

    done = []
    real = sequential._quantize_block

    def interrupted(checkpoint, name, *args, **kw):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(name)
        return real(checkpoint, name, *args, **kw)

    monkeypatch.setattr(sequential, "_quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    assert not (tmp_path / "q").exists() and (tmp_path / ("q" + WORK_SUFFIX) / "job.json").is_file()
    with pytest.raises(dq.DQError, match="different settings"):
        sequential_quantize(tmp_path / "fp", "w8a8-ptq4dm", tmp_path / "q", calib=calib)

    resumed = []
    monkeypatch.setattr(sequential, "_quantize_block", lambda c, name, *a, **k: resumed.append(name) or real(c, name, *a, **k))
    report = sequential_quantize(tmp_path / "fp", recipe, tmp_path / "q", calib=calib)
    assert "capture" in report.stages and not set(resumed) & set(done) and len(done) + len(resumed) == 7
    assert torch.equal(run(_load(tmp_path / "q"), kwargs), run(_load(tmp_path / "whole"), kwargs))


def test_bad_input_is_refused_and_writes_nothing(tmp_path):
    _, _, calib = _saved("sd", tmp_path / "fp")
    with pytest.raises(dq.DQError, match="max_memory"):
        sequential_quantize(tmp_path / "fp", "w4a8-timestep", tmp_path / "a", calib=calib, max_memory=-1)
    with pytest.raises(dq.DQError, match="model directory"):
        sequential_quantize(tmp_path / "fp" / "unet", "w4a8-timestep", tmp_path / "b", calib=calib)
    with pytest.raises(dq.DQError, match="data-free"):
        sequential_quantize(tmp_path / "fp", "w4a16", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]
