"""Pipeline benchmark: per-step denoiser latency and peak memory, 16-bit vs deployed dq recipes.

On a GPU the denoiser is built at full size from its published config with random weights (speed
does not depend on weight values), in bf16 directly on the GPU; text encoders and VAE are skipped
and the denoiser gets correctly shaped dummy inputs for one 1024x1024 image.

    python benchmarks/pipeline.py flux [--recipes bf16,w8a8,w4a16,w4a4,w4a4_lr] [--steps 5]
    dq bench pipeline MODEL          (calls main(argv))
    dq bench pipeline sd15|sdxl|pixart --device cpu     (FP32 vs bundled recipes on the CPU: pipeline_cpu.py)

Recipes (dynamic activations, RTN weights; what matters here is speed and bytes, not quality):
    w8a8     INT8 per-channel weights, INT8 per-token activations
    w4a16    INT4 group-64 weights, bf16 activations
    w4a8     INT4 group-64 weights, INT8 per-token activations
    w4a4     INT4 group-64 weights and activations (per-token groups of 64)
    w4a4_lr  w4a4 plus a rank-32 low-rank branch and smoothing per layer (SVDQuant's deployed form)
    w8a8_fp8 FP8 e4m3 per-channel weights, FP8 per-token activations (sm89+)
    w4a8_pg  UINT4 progressive-group weights (QServe, g64), INT8 per-token activations: one INT8 K loop
    w4a8_pg_lr  w4a8_pg plus smoothing and the rank-32 branch (svdquant-w4a8-progressive's deployed form)
Peers, the same denoiser quantized by torchao (`pip install torchao`, an optional benchmark dependency:
`pip install -e .[bench]`), its linears inside the transformer blocks:
    torchao_fp8  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) (FP8 rowwise, sm89+)
    torchao_int8 Int8DynamicActivationInt8WeightConfig()
With --compile every recipe's denoiser is torch.compile'd (dq's kernels are custom ops: one opaque node each),
so "bf16 --compile" is compiled BF16; without it every recipe runs eager, and both are CUDA-graphed alike.
Linears inside the transformer blocks are quantized; adaLN modulation linears (one token) use W4A16
in the 4-bit recipes (as Nunchaku does) and 8-bit weights in w8a8 / w8a8_fp8; embedders and the output
projection stay bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dq.sizes import module_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
PIXART_SIGMA_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                       cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                       norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2,
                       attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                       upcast_attention=False, norm_elementwise_affine=False, norm_eps=1e-6, dropout=0.0)
TINY = {"flux": dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12)),
        "pixart": dict(PIXART_SIGMA_XL, num_layers=1, num_attention_heads=2, attention_head_dim=32,
                       cross_attention_dim=64, caption_channels=32, sample_size=16)}


def build(model: str, dev: torch.device, dtype: torch.dtype, tiny: bool):
    """(denoiser with random weights, dict of dummy inputs for one 1024x1024 image)."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            if model == "flux":
                cfg = TINY["flux"] if tiny else FLUX_DEV
                m = FluxTransformer2DModel(**cfg)
                img, txt = (64, 8) if tiny else (4096, 512)
                inputs = dict(hidden_states=torch.randn(1, img, cfg["in_channels"]),
                              encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"]),
                              pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]),
                              timestep=torch.tensor([0.5]), img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3),
                              guidance=torch.tensor([3.5]), return_dict=False)
            elif model == "pixart":
                cfg = TINY["pixart"] if tiny else PIXART_SIGMA_XL
                m = PixArtTransformer2DModel(**cfg)
                s = cfg["sample_size"]
                inputs = dict(hidden_states=torch.randn(1, cfg["in_channels"], s, s),
                              encoder_hidden_states=torch.randn(1, 300 if not tiny else 8, cfg["caption_channels"]),
                              timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                              return_dict=False)
            else:
                raise SystemExit(f"unknown model {model!r}; known: flux, pixart")
    finally:
        torch.set_default_dtype(prev)
    return m.eval().requires_grad_(False), inputs


def torchao_quantize(model: nn.Module, recipe: str) -> None:
    """The torchao peer `recipe` applied to the linears inside the transformer blocks, in place."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise SystemExit(f"recipe {recipe} needs torchao: pip install -e .[bench] ({e})") from None
    config = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if recipe == "torchao_fp8"
              else Int8DynamicActivationInt8WeightConfig())
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and "transformer_blocks" in name)


def quantize(model: nn.Module, recipe: str) -> None:
    """Swap and deploy the recipe's layers in place (see the module docstring)."""
    from dq.nn import LayerPlan, deploy_all, swap_layers
    from dq.quant import PerChannel, PerGroup, PerToken, Progressive, QuantSpec

    if recipe == "bf16":
        return
    if recipe.startswith("torchao_"):
        return torchao_quantize(model, recipe)
    w4 = QuantSpec("int4", PerGroup(64))
    a8, pg = QuantSpec("int8", PerToken()), QuantSpec("uint4", Progressive(64), symmetric=False)
    fp8 = (QuantSpec("fp8_e4m3", PerChannel()), QuantSpec("fp8_e4m3", PerToken()))
    main = {"w8a8": (QuantSpec("int8", PerChannel()), a8), "w8a8_fp8": fp8,
            "w4a16": (w4, None), "w4a8": (w4, a8), "w4a8_pg": (pg, a8), "w4a8_pg_lr": (pg, a8),
            "w4a4": (w4, QuantSpec("int4", PerToken(64))), "w4a4_lr": (w4, QuantSpec("int4", PerToken(64)))}[recipe]
    mod = {"w8a8": (QuantSpec("int8", PerChannel()), a8), "w8a8_fp8": fp8}.get(recipe, (w4, None))
    plans = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear) or "transformer_blocks" not in name:
            continue
        w, a = mod if ".norm" in name else main
        plans[name] = LayerPlan("linear", w, a)
    swap_layers(model, plans)
    deploy_all(model)
    if recipe in ("w4a4_lr", "w4a8_pg_lr"):
        for name in plans:
            layer = model.get_submodule(name)
            if ".norm" not in name:
                _add_lowrank(layer, rank=32)


class _LowRankQuantLinear(nn.Module):
    """A deployed QuantLinear plus smoothing and a low-rank branch (stand-in for SVDQLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dq.kernels import quantized_linear

        return quantized_linear(x, self.qweight, self.weight_scale, self.weight_zero, self.bias,
                                weight_format=self.weight_quantizer.spec.format, in_features=self.in_features,
                                act_spec=self.act_quantizer.spec, smooth=self.smooth, lora_down=self.lora_down,
                                lora_up=self.lora_up, channel_scale=self.weight_channel_scale, scheme=self.kernel_scheme)


def _add_lowrank(layer: nn.Module, rank: int) -> None:
    dev, dt = layer.qweight.device, torch.bfloat16
    layer.register_buffer("smooth", (torch.rand(layer.in_features, device=dev) + 0.5).to(dt))
    layer.register_buffer("lora_down", (torch.randn(rank, layer.in_features, device=dev) * 0.02).to(dt))
    layer.register_buffer("lora_up", (torch.randn(layer.out_features, rank, device=dev) * 0.02).to(dt))
    layer.forward = _LowRankQuantLinear.forward.__get__(layer)


def _device_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: 16-bit denoisers on the GPU (this script); cpu: FP32 vs bundled recipes (pipeline_cpu.py)")
    return p


def time_steps(model: nn.Module, inputs: dict, steps: int, warmup: int, graph: bool) -> tuple[float, list[float]]:
    """(median ms per denoiser call, all times). With graph, the step is captured once in a CUDA graph
    after warm-up and replayed, which removes Python/launch overhead for every recipe alike."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        torch.cuda.synchronize()
        step = lambda: model(**inputs)  # noqa: E731
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model(**inputs)
            step = g.replay
        for i in range(steps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            if i >= 1:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], times


def main(argv: list[str] | None = None) -> int:
    device, _ = _device_parser().parse_known_args(argv)
    if device.device == "cpu":
        import pipeline_cpu

        return pipeline_cpu.main(argv)
    p = argparse.ArgumentParser(description="Per-step denoiser latency and peak memory of dq recipes vs bf16.",
                                parents=[_device_parser()])
    p.add_argument("model", choices=["flux", "pixart"], help="denoiser architecture (full size, random weights)")
    p.add_argument("--recipes", default="bf16,w8a8,w4a16,w4a8,w4a4,w4a4_lr")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (autotuning happens here)")
    p.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA graph replays")
    p.add_argument("--tiny", action="store_true", help="tiny config (smoke test, also on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every recipe's denoiser (compiled BF16 for bf16)")
    p.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/pipeline_MODEL)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("dq bench pipeline needs a CUDA GPU for full-size models; use --tiny on CPU.", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    results = []
    for recipe in args.recipes.split(","):
        t0 = time.time()
        model, inputs = build(args.model, dev, torch.bfloat16, args.tiny)
        bf16_bytes = module_bytes(model)
        quantize(model, recipe)
        wb = module_bytes(model)
        if args.compile:
            model = torch.compile(model, fullgraph=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            med, times = time_steps(model, inputs, args.steps, args.warmup, graph=False)
            eager = med
            if not args.eager:
                try:
                    med, times = time_steps(model, inputs, args.steps, 0, graph=True)
                except Exception as e:  # report eager numbers rather than none
                    print(f"CUDA graph capture failed for {recipe}: {e}", file=sys.stderr)
            peak = torch.cuda.max_memory_allocated()
        else:
            with torch.inference_mode():
                model(**inputs)
            med, times, peak = float("nan"), [], 0
        r = {"recipe": recipe, "step_ms": med, "eager_step_ms": eager if cuda else med, "times_ms": times, "weight_bytes": wb, "bf16_weight_bytes": bf16_bytes,
             "weight_ratio": wb / bf16_bytes, "peak_mem_bytes": peak, "setup_s": time.time() - t0}
        results.append(r)
        print(f"{args.model} {recipe}: {med:.1f} ms/step (eager {r['eager_step_ms']:.1f}), weights {wb / 2**30:.2f} GiB ({wb / bf16_bytes:.3f}x bf16), "
              f"peak {peak / 2**30:.2f} GiB", flush=True)
        del model, inputs
        if cuda:
            torch.cuda.empty_cache()
    base = next((r["step_ms"] for r in results if r["recipe"] == "bf16"), None)
    lines = [f"# dq pipeline benchmark: {args.model} denoiser, 1024x1024, batch 1"
             + (f" on {torch.cuda.get_device_name()}" if cuda else " (tiny, CPU)") + (", every recipe torch.compile'd" if args.compile else ""), "",
             "| recipe | ms/step (graph) | eager ms/step | speedup vs bf16 | weights GiB | weights vs bf16 | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        sp = f"{base / r['step_ms']:.2f}x" if base and r["step_ms"] == r["step_ms"] else ""
        lines.append(f"| {r['recipe']} | {r['step_ms']:.1f} | {r['eager_step_ms']:.1f} | {sp} | {r['weight_bytes'] / 2**30:.2f} | "
                     f"{r['weight_ratio']:.3f} | {r['peak_mem_bytes'] / 2**30:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if cuda and not args.tiny:
        import triton

        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "compiled": args.compile, "date": time.strftime("%Y-%m-%d")}
        out = Path(args.out or Path(__file__).parent / "results" / f"pipeline_{args.model}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"env": env, "model": args.model, "results": results}, indent=1))
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
