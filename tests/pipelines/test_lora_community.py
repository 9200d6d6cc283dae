"""Community LoRAs on quantized pipelines: PEFT/diffusers files with conv targets, kohya sd-scripts keys, FLUX in
kohya-BFL and XLabs layouts, several adapters, DoRA, fuse/unfuse, PixArt through PEFT, and loads that fail cleanly.

The quality bar: averaged over several LoRAs, quantized+LoRA is no more than 1 dB (mean per-image PSNR) further
from FP+LoRA than quantized is from FP. One LoRA alone moves that gap by +-2 dB on these tiny models: a LoRA
changes the denoising trajectory, and the quantization error along the new one is larger or smaller."""

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lora_files import SD_LINEAR_TARGETS, SD_TARGETS, kohya_flux, kohya_sd, peft_lora, save_sd_lora, xlabs_flux
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from tiny_pipelines import build, load, run

import dq
import dq.recipes
from dq import reference
from dq.nn import QuantConv2d, QuantLinear, QuantSplitConv2d, SVDQLinear
from dq.pipelines.lora_layers import QuantLoraConv2d, QuantLoraLinear, SVDQLoraLinear, adopt_lora_wrappers

RECIPES = ("w8a8", "svdquant-w4a4")
PROMPTS = reference.prompts("heldout", 8)
LORA_SEEDS = (0, 1, 2, 3)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of the PSNR (peak: the reference's range)."""
    dims = tuple(range(1, ref.dim()))
    peak = ref.amax(dims) - ref.amin(dims)
    mse = (x.float() - ref.float()).pow(2).mean(dims)
    return float((10 * torch.log10(peak.float() ** 2 / mse)).mean())


def generate(pipe, model: str = "ref-sd") -> torch.Tensor:
    kw = dict(reference.generation_kwargs(model), num_inference_steps=10, output_type="pt")
    return pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images


def calib_for(recipe: str) -> dq.CalibConfig | None:
    return dq.CalibConfig(prompts="reference", samples=2, steps=4, batch_size=2) if recipe.startswith("svdquant") else None


def load_reference(model: str, recipe: str | None = None):
    pipe = reference.load(model)
    pipe.set_progress_bar_config(disable=True)
    if recipe is not None:
        dq.quantize(pipe, recipe, calib=calib_for(recipe))
    return pipe


def check_quality(fp0, fp_loras, q0, q_loras) -> None:
    """The mean PSNR gap over the LoRAs is within 1 dB, and every LoRA changed the quantized output."""
    gaps = [psnr(ql, fl) - psnr(q0, fp0) for fl, ql in zip(fp_loras, q_loras)]
    assert sum(gaps) / len(gaps) >= -1.0, gaps
    assert all(psnr(ql, q0) < 60 for ql in q_loras)


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory):
    """LoRA files made with PEFT + save_lora_weights on attention, FF, proj_in/out and ResNet convs; FP outputs."""
    fp = load_reference("ref-sd")
    files, state_dicts, fp_loras = [], [], []
    for seed in LORA_SEEDS:
        state_dict = peft_lora(fp.unet, SD_TARGETS, rank=4, seed=seed, strength=0.25)
        files.append(save_sd_lora(StableDiffusionPipeline, tmp_path_factory.mktemp(f"lora{seed}"), state_dict))
        state_dicts.append(state_dict)
    fp0 = generate(fp)
    for directory in files:
        fp.load_lora_weights(directory, weight_name=WEIGHT_NAME, adapter_name="style")
        fp_loras.append(generate(fp))
        fp.unload_lora_weights()
    return dict(files=files, state_dicts=state_dicts, fp0=fp0, fp_loras=fp_loras)


@pytest.fixture(scope="module", params=RECIPES)
def quantized(request, tmp_path_factory):
    """A quantized ref-sd per recipe, its output, and a saved copy of it (to reload)."""
    pipe = load_reference("ref-sd", request.param)
    saved = tmp_path_factory.mktemp(request.param)
    pipe.save_pretrained(saved)
    return dict(recipe=request.param, pipe=pipe, q0=generate(pipe), saved=saved)


def test_peft_files_with_conv_targets(sd_loras, quantized):
    pipe, q0 = quantized["pipe"], quantized["q0"]
    q_loras = []
    for directory in sd_loras["files"]:
        pipe.load_lora_weights(directory, weight_name=WEIGHT_NAME, adapter_name="style")
        convs = [m for m in pipe.unet.modules() if isinstance(m, QuantLoraConv2d)]
        assert len(convs) > 20 and all(isinstance(m.get_base_layer(), QuantConv2d) for m in convs)
        assert any(isinstance(m, SVDQLoraLinear if quantized["recipe"].startswith("svdquant") else QuantLoraLinear) for m in pipe.unet.modules())
        q_loras.append(generate(pipe))
        pipe.unload_lora_weights()
        assert torch.equal(generate(pipe), q0)
    check_quality(sd_loras["fp0"], sd_loras["fp_loras"], q0, q_loras)
    # the same after a save and reload of the quantized pipeline
    reloaded = StableDiffusionPipeline.from_pretrained(quantized["saved"])
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(reloaded), q0)
    reloaded.load_lora_weights(sd_loras["files"][0], weight_name=WEIGHT_NAME)
    torch.testing.assert_close(generate(reloaded), q_loras[0], rtol=0, atol=1e-5)


def test_kohya_keys_with_alpha_load_as_the_same_lora(sd_loras, quantized):
    """sd-scripts' lora_unet_* names with `alpha` (also A1111's): diffusers converts them; same output as PEFT's."""
    pipe, q0 = quantized["pipe"], quantized["q0"]
    pipe.load_lora_weights(sd_loras["files"][0], weight_name=WEIGHT_NAME, adapter_name="peft")
    via_peft = generate(pipe)
    pipe.delete_adapters("peft")
    assert torch.equal(generate(pipe), q0)
    state_dict = sd_loras["state_dicts"][0]
    rank = next(v for k, v in state_dict.items() if "lora_A" in k).shape[0]
    pipe.load_lora_weights(kohya_sd(state_dict, alpha=2 * rank), adapter_name="kohya")
    torch.testing.assert_close(generate(pipe), via_peft, rtol=0, atol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), q0)


def test_several_adapters_weights_and_delete(quantized):
    pipe, q0 = quantized["pipe"], quantized["q0"]
    fp = reference.load("ref-sd")
    a, b = peft_lora(fp.unet, SD_TARGETS, seed=1, strength=0.5), peft_lora(fp.unet, SD_LINEAR_TARGETS, seed=2, rank=2, strength=0.5)
    assert all(k.startswith("unet.") for k in a)
    pipe.load_lora_weights(dict(a), adapter_name="a")
    only_a = generate(pipe)
    pipe.load_lora_weights(dict(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    torch.testing.assert_close(generate(pipe), only_a, rtol=0, atol=1e-6)
    pipe.set_adapters(["a", "b"], [1.0, 0.7])
    both = generate(pipe)
    assert psnr(both, only_a) < 60
    pipe.delete_adapters("a")
    pipe.set_adapters(["b"], [0.0])
    assert torch.equal(generate(pipe), q0)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), q0)


def test_fuse_is_exact_on_svdq_and_refused_elsewhere(sd_loras, quantized, tmp_path):
    pipe = quantized["pipe"]
    pipe.load_lora_weights(sd_loras["files"][0], weight_name=WEIGHT_NAME, adapter_name="style")
    unfused = generate(pipe)
    # conv (and, for w8a8, every) target is a packed quantized layer: refused before anything fuses
    with pytest.raises(dq.DQError, match="fuse_lora cannot fold adapters into the quantized layers"):
        pipe.fuse_lora()
    assert not any(m.merged for m in pipe.unet.modules() if isinstance(m, LoraLayer))
    assert torch.equal(generate(pipe), unfused)
    pipe.unload_lora_weights()
    if not quantized["recipe"].startswith("svdquant"):
        return
    # attention/FF adapters on SVDQ layers fold into the low-rank branch: same output, exact unfuse
    # (on a reloaded copy: fusing and unloading changes the pipeline for good)
    pipe = StableDiffusionPipeline.from_pretrained(quantized["saved"])
    pipe.set_progress_bar_config(disable=True)
    # (a LoRA on exactly the SVDQ layers: PEFT's own float merge of other layers changes rounding, which W4A4
    # activations then amplify)
    svdq_layers = [n for n, m in pipe.unet.named_modules() if isinstance(m, SVDQLinear)]
    linear = peft_lora(load_reference("ref-sd").unet, svdq_layers, seed=3, strength=0.5)
    pipe.load_lora_weights(dict(linear), adapter_name="lin")
    unfused = generate(pipe)
    ranks = {n.replace(".base_layer", ""): m.rank for n, m in pipe.unet.named_modules() if isinstance(m, SVDQLinear)}
    pipe.fuse_lora()
    assert any(m.rank > ranks[n.replace(".base_layer", "")] for n, m in pipe.unet.named_modules() if isinstance(m, SVDQLinear))
    assert torch.equal(generate(pipe), unfused)
    pipe.unfuse_lora()  # the pipeline's unfuse calls each layer's unmerge, not the model's unfuse_lora
    assert {n.replace(".base_layer", ""): m.rank for n, m in pipe.unet.named_modules() if isinstance(m, SVDQLinear)} == ranks
    saved_plans = pipe.unet.config.quantization_config.to_dict()["modules"]
    assert {n: saved_plans[n]["options"]["rank"] for n in ranks} == ranks
    assert torch.equal(generate(pipe), unfused)
    # fused, unloaded and saved: the checkpoint records the grown branch and reloads to the same output
    pipe.fuse_lora(lora_scale=0.5)
    fused = generate(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), fused)
    pipe.save_pretrained(tmp_path / "fused")
    modules = json.loads((tmp_path / "fused" / "unet" / "config.json").read_text())["quantization_config"]["modules"]
    assert any(plan["options"]["rank"] > ranks[name] for name, plan in modules.items() if name in ranks)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(reloaded), fused)


def test_dora_on_quantized_linears(quantized):
    """PEFT DoRA on a quantized layer computes its column norms against the dequantized weight: each wrapped
    layer equals DoRA on a float layer holding that weight."""
    pipe, q0 = quantized["pipe"], quantized["q0"]
    fp = load_reference("ref-sd")
    dora = peft_lora(fp.unet, SD_LINEAR_TARGETS, seed=4, strength=0.5, use_dora=True)
    assert any("lora_magnitude_vector" in k for k in dora)
    pipe.load_lora_weights(dict(dora), adapter_name="dora")
    wrapped = [(n, m) for n, m in pipe.unet.named_modules()
               if isinstance(m, PeftLoraLinear) and m.lora_variant and isinstance(m.get_base_layer(), QuantLinear)]
    assert len(wrapped) > 20
    for _, m in wrapped[:6]:
        base = m.get_base_layer()
        assert isinstance(base, QuantLinear) and base.deployed
        a, b = m.lora_A["dora"].weight.float(), m.lora_B["dora"].weight.float()
        scaling, magnitude = m.scaling["dora"], m.lora_magnitude_vector["dora"].weight.float()
        norm = (base.weight.float() + scaling * b @ a).norm(dim=1)  # DoRA's column norms, on the dequantized weight
        x = torch.randn(3, base.in_features)
        with torch.no_grad():
            base_out = base(x) - (0 if base.bias is None else base.bias)
            want = (magnitude / norm - 1) * base_out + (magnitude / norm) * scaling * (x @ a.t() @ b.t())
            got = m(x) - base(x)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert torch.isfinite(generate(pipe)).all()
    with pytest.raises(dq.DQError, match="fuse_lora cannot"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), q0)


def test_lycoris_types_are_named_and_change_nothing(quantized):
    pipe, q0 = quantized["pipe"], quantized["q0"]
    conv = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lokr = {f"{base}.lokr_w1": torch.randn(4, 4), f"{base}.lokr_w2": torch.randn(conv.out_features // 4, conv.in_features // 4),
            f"{base}.alpha": torch.tensor(1.0)}
    loha = {f"{base}.hada_w1_a": torch.randn(conv.out_features, 2), f"{base}.hada_w1_b": torch.randn(2, conv.in_features),
            f"{base}.hada_w2_a": torch.randn(conv.out_features, 2), f"{base}.hada_w2_b": torch.randn(2, conv.in_features)}
    for kind, state_dict in (("LoKr", lokr), ("LoHa", loha)):
        with pytest.raises(dq.DQError, match=f"this is a {kind} adapter"):
            pipe.load_lora_weights(state_dict)
    assert not getattr(pipe.unet, "peft_config", {})
    assert torch.equal(generate(pipe), q0)


def test_a_load_failing_inside_peft_is_rolled_back(sd_loras, quantized, monkeypatch):
    pipe, q0 = quantized["pipe"], quantized["q0"]
    calls = {"n": 0}
    original = PeftLoraLinear.update_layer

    def failing_update_layer(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # some layers already carry the adapter by now
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftLoraLinear, "update_layer", failing_update_layer)
    with pytest.raises(dq.DQError, match="loading the LoRA failed .*out of memory.*left as it was"):
        pipe.load_lora_weights(sd_loras["files"][0], weight_name=WEIGHT_NAME, adapter_name="broken")
    assert calls["n"] == 5
    assert not any("broken" in getattr(m, "lora_A", {}) for m in pipe.unet.modules())
    assert "broken" not in (getattr(pipe.unet, "peft_config", None) or {})
    assert torch.equal(generate(pipe), q0)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("layout", ["kohya-bfl", "xlabs"])
def test_flux_loras_in_bfl_and_xlabs_layouts(recipe, layout):
    make = kohya_flux if layout == "kohya-bfl" else xlabs_flux
    fp, kw = build("flux")
    loras = [make(fp.transformer, rank=4, seed=seed) for seed in LORA_SEEDS]
    fp0 = run(fp, kw)
    fp_loras = []
    for lora in loras:
        fp.load_lora_weights(dict(lora), adapter_name="f")
        fp_loras.append(run(fp, kw))
        fp.unload_lora_weights()
    q, _ = build("flux")
    calib_kw = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "output_type")}
    calib = dq.CalibConfig(prompts=["p"], steps=2, samples=1, batch_size=1, pipeline_kwargs=calib_kw) if recipe.startswith("svdquant") else None
    dq.quantize(q, recipe, calib=calib)
    q0 = run(q, kw)
    q_loras = []
    for lora in loras:
        q.load_lora_weights(dict(lora), adapter_name="f")
        wrapped = [m for m in q.transformer.modules() if isinstance(m, (QuantLoraLinear, SVDQLoraLinear))]
        assert len(wrapped) >= (7 if layout == "kohya-bfl" else 8)
        q_loras.append(run(q, kw))
        q.unload_lora_weights()
        assert torch.equal(run(q, kw), q0)
    check_quality(fp0, fp_loras, q0, q_loras)


@pytest.mark.parametrize("recipe", RECIPES)
def test_pixart_lora_through_peft(recipe):
    """PixArt has no diffusers LoRA loader; PEFT's own injection (then adopt_lora_wrappers) works on it."""
    fp = load_reference("ref-pixart")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
    loras = [peft_lora(fp.transformer, targets, seed=seed, strength=0.25, prefix=None) for seed in LORA_SEEDS]

    def with_lora(pipe, lora):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), pipe.transformer, adapter_name="p")
        set_peft_model_state_dict(pipe.transformer, lora, adapter_name="p")
        adopt_lora_wrappers(pipe.transformer)
        out = generate(pipe, "ref-pixart")
        pipe.transformer.delete_adapters("p") if hasattr(pipe.transformer, "delete_adapters") else _delete(pipe.transformer, "p")
        return out

    fp0 = generate(fp, "ref-pixart")
    fp_loras = [with_lora(fp, lora) for lora in loras]
    q = load_reference("ref-pixart", recipe)
    q0 = generate(q, "ref-pixart")
    q_loras = [with_lora(q, lora) for lora in loras]
    check_quality(fp0, fp_loras, q0, q_loras)
    assert torch.equal(generate(q, "ref-pixart"), q0)


def _delete(model, name):
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            m.delete_adapter(name)


# Fast settings for the calibrated recipes on the tiny SD UNet (what is tested here is LoRA, not calibration).
FAST = {"weight_observer": "minmax", "act_observer": "minmax"}
FAST_OPTIONS = {
    "qdiffusion": {"iters": 0, "act_iters": 0, **FAST},
    "tfmq": {"iters": 0, "act_iters": 0, "tib_iters": 0, **FAST},
    "ptq4dm": FAST,
    "svdquant": {"num_grids": 2, "max_tokens": 256},
    "smoothquant": {"max_tokens": 256},
}


@pytest.mark.parametrize("recipe", dq.recipes.bundled_recipe_names())
def test_every_recipe_takes_a_lora_before_and_after_reload(recipe, tmp_path):
    """Every layer kind a recipe deploys (split-shortcut convs included) takes a conv + linear LoRA, and the
    reloaded checkpoint takes it the same way; unloading restores the output bit for bit."""
    pipe, kw = build("sd")
    lora = peft_lora(pipe.unet, SD_TARGETS, strength=0.5)
    r = dq.recipes.load_recipe(recipe)
    r = dataclasses.replace(r, options={**r.options, **FAST_OPTIONS.get(r.method, {})})
    calib_kw = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "output_type")}
    calib = dq.CalibConfig(prompts=["p"], steps=2, samples=1, batch_size=1, pipeline_kwargs=calib_kw) if r.needs_data else None
    dq.quantize(pipe, r, calib=calib)
    pipe.save_pretrained(tmp_path / "q")
    reloaded = load(tmp_path / "q")
    outputs = []
    for p in (pipe, reloaded):
        q0 = run(p, kw)
        p.load_lora_weights(dict(lora), adapter_name="style")
        kinds = {type(m.get_base_layer()) for m in p.unet.modules() if isinstance(m, LoraLayer)}
        out = run(p, kw)
        assert torch.isfinite(out).all() and not torch.equal(out, q0)
        outputs.append(out)
        p.unload_lora_weights()
        assert torch.equal(run(p, kw), q0)
    if r.method == "qdiffusion":
        assert QuantSplitConv2d in kinds
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
