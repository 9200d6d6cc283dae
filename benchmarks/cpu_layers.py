"""CPU layer benchmark: one deployed dq layer against the FP32 nn.Linear it replaces, timed back to back.

Shapes are [M tokens, K in, N out] of SD1.5 at 256x256, batch 2 (M = 2048 at the top level, 32 at the
deepest), then of the bundled ref-sd UNet in `dq demo` (batch 16 with CFG, 64 channels, 8x8 to 2x2 positions);
each recipe's layer kind as the recipe deploys it (svdq: rank 32, smoothing). Then W8A8 convs at the ref-sd
shapes, against nn.Conv2d. Every deployed layer runs twice: with dq's C kernels (dq.kernels.cpu_kernels, the
default) and with torch ops only (what DQ_CPU_KERNELS=0 runs). On CPUs with 8-bit dot products a deployed W8A8
linear takes the integer form (torch ops with torch._int_mm) where it pays (dq.kernels.cpu_gemm.int8_gemm_pays: at
least INT8_GEMM_MIN_ROWS rows and INT8_GEMM_MIN_MACS multiply-adds) and the C call below; there W8A8 linears also run
with the C call's float GEMM at every size (DQ_CPU_INT8_GEMM=0), and everywhere with torch._int_mm at every size
(DQ_CPU_INT8_GEMM=1). Prints the median ratio of the interleaved pairs per shape and writes
benchmarks/results/cpu_layers.{md,json} (--out for another name).

    python benchmarks/cpu_layers.py [--pairs 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dq.kernels import cpu_gemm, cpu_kernels  # noqa: E402
from dq.metrics.perf import cpu_name  # noqa: E402
from dq.nn import LayerPlan, deploy_all, swap_layers  # noqa: E402
from dq.quant import PerChannel, PerGroup, PerToken, QuantSpec  # noqa: E402

W4 = QuantSpec("int4", PerGroup(64))
PLANS = {
    "w8a8": LayerPlan("linear", QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken())),
    "w4a16": LayerPlan("linear", W4, None),
    "w4a8": LayerPlan("linear", W4, QuantSpec("int8", PerToken())),
    "svdquant-w4a8": LayerPlan("svdq_linear", W4, QuantSpec("int8", PerToken()), {"rank": 32}),
    "svdquant-w4a4": LayerPlan("svdq_linear", W4, QuantSpec("int4", PerToken(64)), {"rank": 32}),
}
SHAPES = [(2048, 320, 2560), (2048, 1280, 320), (512, 640, 640), (256, 1280, 1280), (128, 1280, 1280),
          (32, 1280, 10240), (1024, 64, 64), (256, 64, 256), (64, 64, 64)]  # 256 x 1280 x 1280: at the row threshold
CONV_W8A8 = LayerPlan("conv2d", QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken()))
CONV_SHAPES = [(16, 32, 8, 8, 3), (16, 64, 4, 4, 3), (16, 64, 4, 4, 1), (16, 128, 2, 2, 3)]  # N, C, H, W, kernel


def paired_ratio(fp: nn.Module, variant: nn.Module, x: torch.Tensor, pairs: int) -> float:
    """Median over `pairs` back-to-back calls of variant time / FP time (after one warm-up each)."""
    fp(x), variant(x)
    ratios = []
    for _ in range(pairs):
        start = time.perf_counter()
        fp(x)
        mid = time.perf_counter()
        variant(x)
        ratios.append((time.perf_counter() - mid) / (mid - start))
    return statistics.median(ratios)


def torch_ops_ratio(fp: nn.Module, variant: nn.Module, x: torch.Tensor, pairs: int) -> float:
    """paired_ratio with dq's C kernels switched off: the deployed layer runs torch ops only."""
    library, cpu_kernels.library = cpu_kernels.library, lambda: None
    try:
        return paired_ratio(fp, variant, x, pairs)
    finally:
        cpu_kernels.library = library


def forced_gemm_ratio(fp: nn.Module, variant: nn.Module, x: torch.Tensor, pairs: int, integer: bool) -> float:
    """paired_ratio with the INT8 x INT8 product forced to torch._int_mm in torch ops (DQ_CPU_INT8_GEMM=1), or
    to the C call's float GEMM (DQ_CPU_INT8_GEMM=0)."""
    before = os.environ.get(cpu_gemm.ENV_VAR)
    os.environ[cpu_gemm.ENV_VAR] = "1" if integer else "0"
    cpu_gemm.int8_gemm_is_fast.cache_clear()
    try:
        return (torch_ops_ratio if integer else paired_ratio)(fp, variant, x, pairs)
    finally:
        if before is None:
            del os.environ[cpu_gemm.ENV_VAR]
        else:
            os.environ[cpu_gemm.ENV_VAR] = before
        cpu_gemm.int8_gemm_is_fast.cache_clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Deployed dq layers vs FP32 nn.Linear on the CPU.")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_layers"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    integer_routing = cpu_gemm.int8_gemm_is_fast()
    extra = {"w8a8_int_mm": "torch._int_mm"} | ({"w8a8_float_gemm": "float GEMM"} if integer_routing else {})
    rows = []
    with torch.inference_mode():
        for m, k, n in SHAPES:
            fp = nn.Sequential(nn.Linear(k, n)).eval()
            x = torch.randn(m, k)
            row = {"shape": [m, k, n]}
            for name, plan in PLANS.items():
                variant = copy.deepcopy(fp)
                swap_layers(variant, {"0": plan})
                deploy_all(variant)
                row[name] = paired_ratio(fp, variant, x, args.pairs)
                row[f"{name}_torch_ops"] = torch_ops_ratio(fp, variant, x, args.pairs)
                if name == "w8a8":
                    row["w8a8_int_mm"] = forced_gemm_ratio(fp, variant, x, args.pairs, integer=True)
                    if integer_routing:
                        row["w8a8_float_gemm"] = forced_gemm_ratio(fp, variant, x, args.pairs, integer=False)
            rows.append(row)
            print(" ".join([f"{m}x{k}x{n}:"] + [f"{name} {row[name]:.2f}x ({row[name + '_torch_ops']:.2f}x)" for name in PLANS]
                           + [f"w8a8 {label} {row[key]:.2f}x" for key, label in extra.items()]), flush=True)
        conv_rows = []
        for n, c, h, w, k in CONV_SHAPES:
            fp = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2)).eval()
            x = torch.randn(n, c, h, w)
            variant = copy.deepcopy(fp)
            swap_layers(variant, {"0": CONV_W8A8})
            deploy_all(variant)
            fused, plain = paired_ratio(fp, variant, x, args.pairs), torch_ops_ratio(fp, variant, x, args.pairs)
            conv_rows.append({"shape": [n, c, h, w, k], "w8a8": fused, "w8a8_torch_ops": plain})
            print(f"conv {n}x{c}x{h}x{w} k{k}: w8a8 {fused:.2f}x (torch ops {plain:.2f}x)", flush=True)
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
           "int8_dot_flags": sorted(cpu_gemm.cpu_flags() & set(cpu_gemm.INT8_DOT_FLAGS)), "int8_gemm_chosen": integer_routing,
           "int8_gemm_min_rows": cpu_gemm.INT8_GEMM_MIN_ROWS, "int8_gemm_min_macs": cpu_gemm.INT8_GEMM_MIN_MACS}
    lines = [f"# dq CPU layers vs FP32 nn.Linear ({env['cpu']}, {env['threads']} threads, torch {env['torch']}, {env['date']})",
             "", f"Median of {args.pairs} back-to-back pairs: deployed layer time / FP32 time, with dq's C kernels "
             "(in parentheses: torch ops only, DQ_CPU_KERNELS=0).",
             f"8-bit dot-product flags: {', '.join(env['int8_dot_flags']) or 'none'}; W8A8 linears' INT8 x INT8 product here: "
             + (f"torch._int_mm where it pays (at least {cpu_gemm.INT8_GEMM_MIN_ROWS} rows and "
                f"2^{cpu_gemm.INT8_GEMM_MIN_MACS.bit_length() - 1} multiply-adds), the C call's float GEMM below"
                if integer_routing else "the C call's float GEMM")
             + " (last columns: each form forced at every size; torch._int_mm runs in torch ops).", "",
             "| M x K x N | " + " | ".join(PLANS) + "".join(f" | w8a8, {label}" for label in extra.values()) + " |",
             "|---|" + "---|" * (len(PLANS) + len(extra))]
    for row in rows:
        cells = [f"{row[name]:.2f}x ({row[name + '_torch_ops']:.2f}x)" for name in PLANS] + [f"{row[key]:.2f}x" for key in extra]
        lines.append("| " + "x".join(map(str, row["shape"])) + " | " + " | ".join(cells) + " |")
    lines += ["", "W8A8 Conv2d (C -> C) vs FP32 nn.Conv2d at the ref-sd demo's shapes:", "",
              "| N x C x H x W, kernel | w8a8 | w8a8, torch ops only |", "|---|---|---|"]
    for row in conv_rows:
        n, c, h, w, k = row["shape"]
        lines.append(f"| {n}x{c}x{h}x{w}, {k}x{k} | {row['w8a8']:.2f}x | {row['w8a8_torch_ops']:.2f}x |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "conv_rows": conv_rows}, indent=1))
    out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
