"""SVDQuant benchmark: W4A4 quality of naive RTN vs SmoothQuant vs SVDQuant (+GPTQ), NVFP4 and W4A8 rows,
LoRA on the quantized model, and per-layer calibration time of randomized vs exact SVD.

Quality is measured against the FP pipeline of the same run (same prompts, seeds and steps): PSNR and
LPIPS per image pair, FID with the domain-CLIP backbone (FP images as the reference set) and domain-CLIP
score (FP's score in the same table). Calibration time is the wall time of `dq.quantize`.

    python benchmarks/svdquant.py                       # ref-pixart + ref-sd, defaults sized for ~10-15 min on CPU
    python benchmarks/svdquant.py --models ref-sd --prompts 8 --steps 8
    python benchmarks/svdquant.py --tiny                # tiny random pipelines (smoke test, no reference weights)
    python benchmarks/svdquant.py --layers-only         # only the FLUX-sized per-layer calibration timing

Writes benchmarks/results/svdquant_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dq  # noqa: E402
from dq import CalibConfig  # noqa: E402
from dq.calib.svdquant import SVDQuantConfig, Smoothing, calibrate_unit  # noqa: E402
from dq.quant.lowrank import SVDMethod  # noqa: E402
from dq.nn import SVDQLinear  # noqa: E402
from dq.quant import PerGroup, PerToken, QuantSpec  # noqa: E402
from dq.recipes import load_recipe  # noqa: E402

RECIPES = ("w4a4", "smoothquant-w4a4", "svdquant-w4a4", "svdquant-w4a4-gptq", "svdquant-nvfp4", "w4a8", "svdquant-w4a8")
FLUX_SHAPES = ((3072, 3072), (12288, 3072))  # (out, in): FLUX.1 attention projection and MLP fc1


# -- per-layer calibration time ------------------------------------------------------------------------
def synthetic_layer(out_f: int, in_f: int, tokens: int, seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A linear layer and inputs with a few outlier channels, the statistics SVDQuant targets."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    x = torch.randn(tokens, in_f, generator=g)
    idx = torch.randperm(in_f, generator=g)[: max(4, in_f // 256)]
    x[:, idx] *= 25
    return lin, x


def time_layer(out_f: int, in_f: int, svd: str, smooth: str, tokens: int, rank: int = 32, num_grids: int = 20) -> dict:
    lin, x = synthetic_layer(out_f, in_f, tokens)
    w4, a4 = QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64))
    layer = SVDQLinear.wrap(lin, w4, a4, rank=rank)
    options = SVDQuantConfig(rank=rank, svd=SVDMethod(svd), smooth=Smoothing(smooth), num_grids=num_grids, alpha=0.5 if smooth == "fixed" else None)
    t0 = time.perf_counter()
    res = calibrate_unit([layer], x, x.abs().amax(0), options)
    seconds = time.perf_counter() - t0
    return {
        "shape": [out_f, in_f], "svd": svd, "smooth": smooth, "candidates": len(res.errors), "tokens": tokens,
        "seconds": round(seconds, 2), "alpha": res.alpha, "rel_output_mse": res.error,
    }


def layer_timing(args) -> list[dict]:
    """Randomized SVD with the full 20-point search on both shapes; exact float64 SVD (deepcompressor's
    per-candidate cost) with one fixed candidate, whose time is one candidate's SVD plus the final one."""
    rows = []
    for out_f, in_f in FLUX_SHAPES:
        rows.append(time_layer(out_f, in_f, "randomized", "search", args.layer_tokens))
        print(json.dumps(rows[-1]), flush=True)
        if args.full_exact or out_f * in_f <= 3072 * 3072:
            rows.append(time_layer(out_f, in_f, "exact", "search" if args.full_exact else "fixed", args.layer_tokens))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -- pipelines ---------------------------------------------------------------------------------------------
def load_model(name: str, tiny: bool):
    if tiny:
        from tiny_pipelines import build

        pipe, kw = build(name)
        kw = {k: v for k, v in kw.items() if k not in ("output_type",)}
        return pipe, kw, None
    from dq import reference

    return reference.load(name), reference.generation_kwargs(name), reference


def generate(pipe, prompts, kw, steps: int, tiny: bool) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        gen = torch.Generator().manual_seed(1000 + i)
        call = dict(kw, num_inference_steps=steps, generator=gen, output_type="pt")
        if not tiny:
            call["prompt"] = p
        with torch.no_grad():
            out.append(pipe(**call).images.float().clamp(0, 1))
    return torch.cat(out)


def make_metrics(ref_module):
    from dq.metrics import FID, LPIPS, PSNR, OpenCLIPScore

    m = {"psnr": PSNR, "lpips": LPIPS}
    clip = None
    if ref_module is not None:
        try:
            model, _, tokenizer = ref_module.domain_clip()
            clip = (model, tokenizer)
        except dq.DQError as e:
            print(f"no domain CLIP: {e}", flush=True)

    def score(images, fp, prompts) -> dict:
        res = {}
        for name, cls in m.items():
            metric = cls()
            metric.update(images, reference=fp)
            res[name] = metric.compute()["value"]
        if clip is not None:
            c = OpenCLIPScore(clip[0], tokenizer=clip[1])
            c.update(images, prompts=prompts)
            res["clip"] = c.compute()["value"]
            if fp is not images:
                f = FID(backbone=clip[0])
                f.update(images, reference=fp)
                res["fid_vs_fp"] = f.compute()["value"]
        return res

    return score


def random_lora(denoiser, prefix: str, rank: int = 8, scale: float = 0.5, seed: int = 7) -> dict:
    """A fixed random LoRA on the attention projections (a stand-in for a style LoRA)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in denoiser.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q")) and hasattr(m, "in_features"):
            sd[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale / m.in_features**0.5
            sd[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale / rank**0.5
    return sd


def load_lora(pipe, sd: dict) -> None:
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(dict(sd), adapter_name="bench")
    else:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        prefix = next(iter(sd)).split(".")[0]
        denoiser.load_lora_adapter(dict(sd), prefix=prefix, adapter_name="bench")


def pipeline_rows(args) -> list[dict]:
    rows = []
    for name in args.models:
        fp_pipe, kw, ref = load_model(name, args.tiny)
        prompts = ref.prompts("heldout", n=args.prompts) if ref is not None else [f"p{i}" for i in range(args.prompts)]
        calib_prompts = list(ref.prompts("train", n=args.calib_samples)) if ref is not None else ["c"]
        score = make_metrics(ref)
        t0 = time.perf_counter()
        fp = generate(fp_pipe, prompts, kw, args.steps, args.tiny)
        fp_seconds = time.perf_counter() - t0
        fp_scores = score(fp, fp, prompts)
        rows.append({"model": name, "recipe": "fp", "calib_s": 0.0, "generate_s": round(fp_seconds, 1), **{k: v for k, v in fp_scores.items() if k == "clip"}})
        print(json.dumps(rows[-1]), flush=True)
        denoiser_name = "unet" if hasattr(fp_pipe, "unet") and fp_pipe.unet is not None else "transformer"
        # diffusers gives LoRA loading only to some denoisers (UNet2DConditionModel yes, PixArt's transformer no).
        has_lora = hasattr(getattr(fp_pipe, denoiser_name), "load_lora_adapter")
        lora = random_lora(getattr(fp_pipe, denoiser_name), denoiser_name) if args.lora and has_lora else None
        fp_lora = None
        for recipe_name in args.recipes:
            pipe, kw, _ = load_model(name, args.tiny)
            recipe = load_recipe(recipe_name)
            if args.num_grids is not None and recipe.method in ("svdquant", "smoothquant") and "num_grids" in recipe.options:
                recipe = dataclasses.replace(recipe, options={**recipe.options, "num_grids": args.num_grids})
            calib = None
            if recipe.needs_data:
                ckw = dict(kw) if args.tiny else {k: v for k, v in kw.items()}
                calib = CalibConfig(prompts=calib_prompts, steps=args.steps, samples=args.calib_samples, batch_size=4,
                                    sampling="uniform", pipeline_kwargs=ckw)
            t0 = time.perf_counter()
            report = dq.quantize(pipe, recipe, calib=calib)
            calib_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            images = generate(pipe, prompts, kw, args.steps, args.tiny)
            row = {"model": name, "recipe": recipe_name, "calib_s": round(calib_s, 1), "generate_s": round(time.perf_counter() - t0, 1),
                   "compression": round(report.compression, 3), **score(images, fp, prompts)}
            if lora is not None and recipe_name == "svdquant-w4a4":
                if fp_lora is None:
                    fp_pipe2, _, _ = load_model(name, args.tiny)
                    load_lora(fp_pipe2, lora)
                    fp_lora = generate(fp_pipe2, prompts, kw, args.steps, args.tiny)
                load_lora(pipe, lora)
                q_lora = generate(pipe, prompts, kw, args.steps, args.tiny)
                from dq.metrics import PSNR

                m = PSNR()
                m.update(q_lora, reference=fp_lora)
                row["lora_psnr_vs_fp_lora"] = m.compute()["value"]
                m = PSNR()
                m.update(fp_lora, reference=fp)
                row["lora_effect_psnr_fp"] = m.compute()["value"]
                pipe.unload_lora_weights() if hasattr(pipe, "unload_lora_weights") else getattr(pipe, denoiser_name).unload_lora()
                row["unload_bit_identical"] = bool(torch.equal(generate(pipe, prompts[:2], kw, args.steps, args.tiny), images[:2]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- report -------------------------------------------------------------------------------------------------
def fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(result: dict) -> str:
    lines = [f"# SVDQuant benchmark ({result['device']}, {result['torch_threads']} torch threads, shared CPU)", ""]
    if result.get("pipelines"):
        lines += ["## Quality vs the FP pipeline (same prompts, seeds, steps)", "", f"Command: `{result['pipelines_command']}`", "",
                  "| model | recipe | calib s | PSNR dB | LPIPS | FID vs FP (domain CLIP) | CLIP | CLIP / FP | compression |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fp_clip = {r["model"]: r.get("clip") for r in result["pipelines"] if r["recipe"] == "fp"}
        for r in result["pipelines"]:
            ratio = None if r.get("clip") is None or not fp_clip.get(r["model"]) else r["clip"] / fp_clip[r["model"]]
            lines.append(f"| {r['model']} | {r['recipe']} | {fmt(r['calib_s'], 1)} | {fmt(r.get('psnr'), 2)} | {fmt(r.get('lpips'))} | "
                         f"{fmt(r.get('fid_vs_fp'), 2)} | {fmt(r.get('clip'), 2)} | {fmt(ratio)} | {fmt(r.get('compression'))} |")
        lora = [r for r in result["pipelines"] if "lora_psnr_vs_fp_lora" in r]
        if lora:
            lines += ["", "## LoRA on the quantized model (svdquant-w4a4, random rank-8 attention LoRA)", "",
                      "| model | PSNR quant vs FP | PSNR quant+LoRA vs FP+LoRA | PSNR FP+LoRA vs FP (LoRA effect) | unload bit-identical |",
                      "|---|---|---|---|---|"]
            for r in lora:
                lines.append(f"| {r['model']} | {fmt(r['psnr'], 2)} | {fmt(r['lora_psnr_vs_fp_lora'], 2)} | {fmt(r['lora_effect_psnr_fp'], 2)} | {fmt(r['unload_bit_identical'])} |")
    if result.get("layers"):
        lines += ["", "## Per-layer calibration time (FLUX-sized linears, rank 32, W4A4, output error in the loop)", "",
                  f"Command: `{result['layers_command']}` (load average {result.get('loadavg', 'n/a')} on this shared CPU)", "",
                  "| shape [out, in] | SVD | smoothing | candidates scored | tokens | seconds | s per candidate | rel. output MSE |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            per = r["seconds"] / (r["candidates"] + 1)
            lines.append(f"| {r['shape']} | {r['svd']} | {r['smooth']} | {r['candidates']} | {r['tokens']} | {fmt(r['seconds'], 1)} | "
                         f"{fmt(per, 2)} | {r['rel_output_mse']:.4g} |")
        ex = {tuple(r["shape"]): r for r in result["layers"] if r["svd"] == "exact"}
        for r in result["layers"]:
            if r["svd"] == "randomized" and tuple(r["shape"]) in ex:
                e = ex[tuple(r["shape"])]
                projected = e["seconds"] / (e["candidates"] + 1) * (r["candidates"] + 1)
                lines.append("")
                lines.append(f"{r['shape']}: the same {r['candidates']}-candidate search with exact float64 SVD per candidate "
                             f"(as deepcompressor) would take ~{projected:.0f} s (measured per-candidate cost x candidates); "
                             f"randomized: {r['seconds']:.1f} s ({projected / r['seconds']:.0f}x faster).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ref-pixart", "ref-sd"], help="reference pipelines (or tiny families with --tiny)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (one image each)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps (FP and quantized, and calibration)")
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration prompts")
    ap.add_argument("--num-grids", type=int, default=None, help="override the smoothing grid of svdquant recipes")
    ap.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA rows")
    ap.add_argument("--tiny", action="store_true", help="tiny random pipelines from tests/tiny_pipelines.py")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--no-layers", dest="layers", action="store_false")
    ap.add_argument("--layer-tokens", type=int, default=1024)
    ap.add_argument("--full-exact", action="store_true", help="run the exact-SVD full grid on the large layer too (minutes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.tiny and args.models == ["ref-pixart", "ref-sd"]:
        args.models = ["pixart", "sd"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import os

    result = {"device": device, "torch_threads": torch.get_num_threads(), "loadavg": [round(v, 1) for v in os.getloadavg()], "platform": platform.platform(),
              "command": " ".join(["python benchmarks/svdquant.py"] + sys.argv[1:]), "settings": vars(args)}
    if not args.layers_only:
        result["pipelines"] = pipeline_rows(args)
    if args.layers or args.layers_only:
        result["layers"] = layer_timing(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"svdquant_{device}" + ("_tiny" if args.tiny else "")
    previous = out / f"{stem}.json"
    if previous.is_file():
        # A run of one part keeps the other part's rows from the previous run (labelled with its command).
        old = json.loads(previous.read_text())
        for part in ("pipelines", "layers"):
            if part not in result and part in old:
                result[part] = old[part]
                result[f"{part}_command"] = old.get(f"{part}_command", old.get("command"))
        if "pipelines" in result and "pipelines" in old and result.get("pipelines_command") is None:
            # Rows of models this run did not measure stay, with the command that measured them.
            ran = {r["model"] for r in result["pipelines"]}
            kept = [r for r in old["pipelines"] if r["model"] not in ran]
            if kept:
                result["pipelines"] = kept + result["pipelines"]
                result["pipelines_command"] = f"{old.get('pipelines_command')} ; then {result['command']}"
    for part in ("pipelines", "layers"):
        if part in result:
            result.setdefault(f"{part}_command", result["command"])
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
