"""LoRA on dq-quantized pipelines: adapters fused into SVDQ branches, PEFT side branches on other
quantized layers, strengths, composition, exact unload, bad input, and training on a quantized base."""

import dataclasses

import pytest
import torch

import dq
from dq import CalibConfig
from dq.nn import QuantLinear, SVDQLinear
from dq.pipelines.lora_layers import SVDQLoraLinear
from dq.recipes import load_recipe
from tiny_pipelines import build, run


def make_lora(unet, rank=4, seed=1, scale=0.3, targets=("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn1.to_out.0", "ff.net.2")):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if name.endswith(targets):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale / m.in_features**0.5
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    return sd


def rel(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.fixture(scope="module")
def pipes():
    fp, kw = build("sd")
    lora_a, lora_b = make_lora(fp.unet, seed=1), make_lora(fp.unet, seed=2, rank=2)
    ref = run(fp, kw)
    fp.load_lora_weights(dict(lora_a), adapter_name="a")
    ref_a = run(fp, kw)
    fp.unload_lora_weights()
    q, _ = build("sd")
    recipe = dataclasses.replace(load_recipe("svdquant-w4a4"), options={"rank": 8, "num_grids": 2, "max_tokens": 256})
    dq.quantize(q, recipe, calib=CalibConfig(prompts=["p"], steps=2, samples=1, batch_size=1, pipeline_kwargs=dict(kw)))
    return dict(kw=kw, q=q, lora_a=lora_a, lora_b=lora_b, ref=ref, ref_a=ref_a, q0=run(q, kw))


def test_lora_on_svdq_fused_and_exact_unload(pipes):
    q, kw = pipes["q"], pipes["kw"]
    q.load_lora_weights(dict(pipes["lora_a"]), adapter_name="a")
    fused = [m for m in q.unet.modules() if type(m) is SVDQLoraLinear]
    assert fused and all(isinstance(m.get_base_layer(), SVDQLinear) for m in fused)
    out = run(q, kw)
    # The LoRA's effect survives quantization: quantized+LoRA is as close to FP+LoRA as quantized is to FP.
    assert rel(out, pipes["ref_a"]) < 1.25 * rel(pipes["q0"], pipes["ref"]) + 1e-3
    assert rel(out, pipes["q0"]) > 0.1 * rel(pipes["ref_a"], pipes["ref"])
    # The fused branch computes PEFT's side branch (x/s through A diag(s) is A x).
    m = fused[0]
    x = torch.randn(2, 7, m.in_features)
    peft_forward = type(m).__mro__[1].forward
    with torch.no_grad():
        torch.testing.assert_close(m(x), peft_forward(m, x), rtol=2e-2, atol=2e-2)
    # Strength 0 gives the pre-LoRA output bit for bit; unloading restores it bit for bit.
    q.set_adapters(["a"], [0.0])
    assert torch.equal(run(q, kw), pipes["q0"])
    q.set_adapters(["a"], [1.0])
    assert torch.equal(run(q, kw), out)
    q.unload_lora_weights()
    assert torch.equal(run(q, kw), pipes["q0"])
    assert not any(type(m) is SVDQLoraLinear for m in q.unet.modules())


def test_loras_compose(pipes):
    q, kw = pipes["q"], pipes["kw"]
    q.load_lora_weights(dict(pipes["lora_a"]), adapter_name="a")
    only_a = run(q, kw)
    q.load_lora_weights(dict(pipes["lora_b"]), adapter_name="b")
    q.set_adapters(["a", "b"], [1.0, 0.0])
    assert torch.equal(run(q, kw), only_a)
    q.set_adapters(["a", "b"], [1.0, 0.7])
    both = run(q, kw)
    assert not torch.equal(both, only_a)
    m = next(m for m in q.unet.modules() if type(m) is SVDQLoraLinear and "b" in m.lora_A)
    x = torch.randn(3, m.in_features)
    with torch.no_grad():
        torch.testing.assert_close(m(x), type(m).__mro__[1].forward(m, x), rtol=2e-2, atol=2e-2)
    q.unload_lora_weights()
    assert torch.equal(run(q, kw), pipes["q0"])


def test_bad_lora_is_refused_and_model_unchanged(pipes):
    q, kw = pipes["q"], pipes["kw"]
    bad_name = {k.replace("attn1.to_q", "attn1.to_query"): v for k, v in pipes["lora_a"].items()}
    with pytest.raises(dq.DQError, match=r"attn1\.to_query' does not exist"):
        q.load_lora_weights(bad_name, adapter_name="bad1")
    bad_shape = dict(pipes["lora_a"])
    key = next(k for k in bad_shape if "up_blocks.1" in k and "to_q.lora_A" in k)
    bad_shape[key] = torch.randn(4, 17)
    with pytest.raises(dq.DQError, match=r"lora_A \[4, 17\].*do not fit"):
        q.load_lora_weights(bad_shape, adapter_name="bad2")
    assert not getattr(q.unet, "peft_config", {})
    assert torch.equal(run(q, kw), pipes["q0"])


def test_peft_side_branch_on_plain_quant_layers():
    fp, kw = build("sd")
    lora = make_lora(fp.unet)
    ref = run(fp, kw)
    fp.load_lora_weights(dict(lora), adapter_name="a")
    ref_a = run(fp, kw)
    q, _ = build("sd")
    dq.quantize(q, "w4a16")
    q0 = run(q, kw)
    q.load_lora_weights(dict(lora), adapter_name="a")
    wrapped = [m for m in q.unet.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, QuantLinear)]
    assert wrapped and all(m.base_layer.deployed for m in wrapped)
    out = run(q, kw)
    assert rel(out, ref_a) < 1.25 * rel(q0, ref) + 1e-3
    q.unload_lora_weights()
    assert torch.equal(run(q, kw), q0)


def test_train_lora_on_quantized_base(pipes):
    from peft import LoraConfig

    q = pipes["q"]
    unet = q.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"), adapter_name="qlora")
    try:
        unet.train()
        params = [p for n, p in unet.named_parameters() if p.requires_grad]
        assert params and all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
        x = torch.randn(1, 4, 8, 8)
        out = unet(x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 7, 64)).sample
        out.pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        assert any(float(p.grad.abs().sum()) > 0 for p in params)
    finally:
        unet.eval()
        unet.delete_adapters("qlora")
    assert torch.equal(run(q, pipes["kw"]), pipes["q0"])
