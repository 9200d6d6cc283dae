"""Kernel benchmark: latency and TFLOP/s of dq's quantized linear kernels against torch baselines.

Runs over the linear shapes of SD1.5, SDXL, PixArt-Sigma, FLUX.1 and Wan 2.1 at M (tokens x batch)
from 1 to 16384; prints a markdown table and writes JSON + markdown to benchmarks/results/.

    python benchmarks/kernels.py [--quick] [--models flux,wan] [--out benchmarks/results/kernels_h200]
    dq bench kernels ...            (calls main(argv))

Timing: each method is captured in a CUDA graph that cycles through enough copies of its inputs
to exceed the L2 cache (so small-M, weight-bound rows read weights from HBM, as in a real model), and
the graph replay is timed with triton.testing.do_bench (median); launch overhead is excluded for
torch and Triton alike. FLOPs are 2*M*N*K for every row (the low-rank branch is not counted).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline.py's torchao peers

SHAPES: dict[str, list[tuple[str, int, int]]] = {  # (layer, N=out, K=in)
    "flux": [("qkv/proj 3072", 3072, 3072), ("ff_in/proj_mlp", 12288, 3072), ("ff_out", 3072, 12288),
             ("single proj_out", 3072, 15360)],
    "sd15": [("attn 320", 320, 320), ("geglu 320", 2560, 320), ("ff_out 1280", 320, 1280), ("attn 1280", 1280, 1280)],
    "sdxl": [("attn 1280", 1280, 1280), ("geglu 1280", 10240, 1280), ("ff_out 5120", 1280, 5120)],
    "pixart": [("attn 1152", 1152, 1152), ("ff_in", 4608, 1152), ("ff_out", 1152, 4608)],
    "wan": [("attn 5120", 5120, 5120), ("ffn_in", 13824, 5120), ("ffn_out", 5120, 13824)],
}
M_VALUES = [1, 16, 256, 1024, 4096, 16384]
RANK = 32
GROUP = 64
L2_BYTES = 60 * 2**20


def _graph_time(fns: list, calls: int) -> float:
    """Median ms per call of fns cycled `calls` times inside one CUDA graph (timed with do_bench)."""
    import triton

    for f in fns:  # warm up: autotuning and compilation happen here, outside the graph
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")
    return ms / calls


def _copies(nbytes: int) -> int:
    return max(1, min(16, -(-3 * L2_BYTES // max(nbytes, 1))))


def _make_int4(N: int, K: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
    s = (torch.rand(N, K // GROUP, device=dev) * 0.01 + 0.001).half()
    return q, s


def _make_progressive(N: int, K: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random progressive-group weights as a layer stores them: packed UINT4, uint8 s2 and z, fp16 s1."""
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
    s2 = torch.randint(1, 17, (N, K // GROUP), dtype=torch.uint8, device=dev)
    z = torch.randint(0, 16, (N, K // GROUP), dtype=torch.uint8, device=dev)
    return q, s2, z, (torch.rand(N, 1, device=dev) * 1e-3).half()


def _torchao_layers(peer: str, weights: list[torch.Tensor], bias: torch.Tensor) -> list[nn.Module]:
    """nn.Linear copies of `weights` quantized by torchao's `peer` config (pipeline.torchao_quantize); [] without torchao."""
    from pipeline import torchao_quantize

    layers = []
    for w in weights:
        layer = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        layer.weight.data, layer.bias.data = w.clone(), bias.clone()
        holder = nn.ModuleDict({"transformer_blocks": nn.ModuleList([layer])})  # torchao_quantize's filter
        try:
            torchao_quantize(holder, peer)
        except SystemExit as e:
            print(f"  {peer}: {e}", file=sys.stderr)
            return []
        layers.append(holder["transformer_blocks"][0])
    return layers


def bench_shape(M: int, N: int, K: int, methods: set[str]) -> dict[str, float]:
    """ms per call of every method at one (M, N, K)."""
    from dq.kernels import ops  # noqa: F401
    from dq.kernels.act_quant import FMT_INT4, FMT_INT4_FP8, FMT_INT4_I8, FMT_INT8, quantize_activations
    from dq.kernels.w4a4_gemm import w4_gemm, w4_linear
    from dq.kernels.w4a4_mma8 import w4a4_mma8_gemm
    from dq.kernels.w8a8_gemm import w8_gemm, w8a8_linear

    dev = torch.device("cuda")
    bf = torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=bf)
    bias = torch.randn(N, device=dev, dtype=bf)
    smooth = (torch.rand(K, device=dev) + 0.5).to(bf)
    ld = (torch.randn(RANK, K, device=dev) * 0.02).to(bf)
    lu = (torch.randn(N, RANK, device=dev) * 0.02).to(bf)
    calls = 64 if M * N * K < 2**34 else 16
    out: dict[str, float] = {}
    n16 = _copies(N * K * 2 + M * K * 2)
    n4 = _copies(N * K // 2 + M * K // 2)
    n8 = _copies(N * K + M * K)

    def run(name, fns):
        if name in methods:
            try:
                out[name] = _graph_time(fns, calls)
            except Exception as e:  # report, keep going: one unsupported baseline must not end the table
                out[name] = float("nan")
                print(f"  {name} M={M} N={N} K={K}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)

    ws = [torch.randn(N, K, device=dev, dtype=bf) for _ in range(n16)]
    run("bf16", [lambda w=w: F.linear(x, w, bias) for w in ws])
    for peer in ("torchao_fp8", "torchao_int8"):
        if peer in methods:
            layers = _torchao_layers(peer, ws[:n8], bias)
            if layers:
                run(peer, [lambda m=m: m(x) for m in layers])
    del ws
    w4 = [_make_int4(N, K, dev) for _ in range(n4)]
    # W4A4: the dispatcher's path (byte-code kernel, FP8 or INT8 MMA as its self-check picks), and the
    # unpacking INT8 kernel it replaced (mma8=False), each with and without the low-rank branch.
    run("w4a4_lr", [lambda q=q, s=s: torch.ops.dq.w4_linear(x, q, s, bias, smooth, ld, lu, GROUP, 4) for q, s in w4])
    run("w4a4", [lambda q=q, s=s: torch.ops.dq.w4_linear(x, q, s, bias, None, None, None, GROUP, 4) for q, s in w4])
    run("w4a4_old", [lambda q=q, s=s: w4_linear(x, q, s, bias, GROUP, 4, mma8=False) for q, s in w4])
    run("w4a4_old_lr", [lambda q=q, s=s: w4_linear(x, q, s, bias, GROUP, 4, smooth, ld, lu, mma8=False) for q, s in w4])
    if {"w4a4_gemm", "w4a4_gemm_i8", "w4a4_gemm_noasm", "w4a4_old_gemm", "w4a4_unfused",
            "act_quant_lr"} & methods:
        qf, sf, _ = quantize_activations(x, FMT_INT4_FP8, GROUP)
        qi, si, _ = quantize_activations(x, FMT_INT4_I8, GROUP)
        run("w4a4_gemm", [lambda q=q, s=s: w4a4_mma8_gemm(qf, sf, q, s, bias, None, None, bf, GROUP) for q, s in w4])
        run("w4a4_gemm_i8", [lambda q=q, s=s: w4a4_mma8_gemm(qi, si, q, s, bias, None, None, bf, GROUP) for q, s in w4])
        run("w4a4_gemm_noasm", [lambda q=q, s=s: w4a4_mma8_gemm(qf, sf, q, s, bias, None, None, bf, GROUP, use_asm=False)
                                for q, s in w4])
        qa, sa, _ = quantize_activations(x, FMT_INT4, GROUP)
        run("w4a4_old_gemm", [lambda q=q, s=s: w4_gemm(qa, sa, q, s, bias, None, None, bf, GROUP) for q, s in w4])
        run("act_quant_lr", [lambda: quantize_activations(x, FMT_INT4_FP8, GROUP, smooth, ld)])

        def unfused(q, s):
            xs = x / smooth
            qf, sf, _ = quantize_activations(xs, FMT_INT4_FP8, GROUP)
            y = w4a4_mma8_gemm(qf, sf, q, s, bias, None, None, bf, GROUP)
            return y + (xs @ ld.t()) @ lu.t()

        run("w4a4_unfused", [lambda q=q, s=s: unfused(q, s) for q, s in w4])
    run("w4a8", [lambda q=q, s=s: torch.ops.dq.w4_linear(x, q, s, bias, None, None, None, GROUP, 8) for q, s in w4])
    if {"w4a8_pg", "w4a8_pg_lr", "w4a8_pg_gemm"} & methods:
        from dq.kernels.w4a8_progressive import w4a8_progressive_gemm

        pg = [_make_progressive(N, K, dev) for _ in range(n4)]
        run("w4a8_pg", [lambda w=w: torch.ops.dq.w4a8_progressive_linear(x, *w, bias, None, None, None) for w in pg])
        run("w4a8_pg_lr", [lambda w=w: torch.ops.dq.w4a8_progressive_linear(x, *w, bias, smooth, ld, lu) for w in pg])
        qa8, sa8, _ = quantize_activations(x, FMT_INT8, None)
        run("w4a8_pg_gemm", [lambda w=w: w4a8_progressive_gemm(qa8, sa8, *w, bias, None, None, bf) for w in pg])
        run("act_quant_i8", [lambda: quantize_activations(x, FMT_INT8, None)])
        del pg
    if M <= 1024:
        run("w4a16", [lambda q=q, s=s: torch.ops.dq.w4a16_linear(x, q, s, bias, None, None, None, GROUP) for q, s in w4])
    del w4
    w8 = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev) for _ in range(n8)]
    sw8 = (torch.rand(N, 1, device=dev) * 0.01).half()
    run("w8a8", [lambda q=q: torch.ops.dq.w8a8_linear(x, q, sw8, bias, None, None, None) for q in w8])
    qa8, sa8, _ = quantize_activations(x, FMT_INT8, None)
    run("w8a8_gemm", [lambda q=q: w8_gemm(qa8, sa8, q, sw8, None, None, None, bf) for q in w8])
    if M > 16:
        wt = [q.t() for q in w8]  # _int_mm wants B as [K, N]; the transposed view is column-major (cuBLAS "TN")
        run("int_mm", [lambda b=b: torch._int_mm(qa8, b) for b in wt])
    del w8
    if torch.cuda.get_device_capability() >= (8, 9):
        xf = x.to(torch.float8_e4m3fn)
        wf = [torch.randn(N, K, device=dev).to(torch.float8_e4m3fn) for _ in range(n8)]
        sa = torch.ones(M, 1, device=dev)
        sb = torch.ones(1, N, device=dev)
        run("scaled_mm_fp8", [lambda w=w: torch._scaled_mm(xf, w.t(), scale_a=sa, scale_b=sb, out_dtype=bf) for w in wf])
        run("w8a8_fp8", [lambda w=w: torch.ops.dq.w8a8_linear(x, w, sw8, bias, None, None, None) for w in wf])
        for backend in ("triton", "scaled_mm"):
            run(f"w8a8_fp8_{backend}", [lambda w=w, b=backend: w8a8_linear(x, w, sw8, bias, backend=b) for w in wf])
        del wf
    return out


METHODS = ["bf16", "torchao_fp8", "torchao_int8", "int_mm", "scaled_mm_fp8", "w4a4_lr", "w4a4", "w4a4_unfused", "w4a4_gemm", "w4a4_gemm_i8",
           "w4a4_gemm_noasm", "act_quant_lr", "w4a4_old_lr", "w4a4_old", "w4a4_old_gemm", "w4a8",
           "w4a8_pg", "w4a8_pg_lr", "w4a8_pg_gemm", "act_quant_i8", "w8a8_fp8_triton", "w8a8_fp8_scaled_mm",
           "w8a8", "w8a8_gemm", "w8a8_fp8", "w4a16"]


def env_info() -> dict:
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        q = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,temperature.gpu"
        info["nvidia_smi"] = dict(zip(q.split(","), subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.strip().split(", ")))
    except Exception as e:  # clocks are informative only
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


RATIOS = [  # (header, numerator, denominator): time ratios, so "vs bf16" columns are speedups over bf16
    ("w4a4_lr vs bf16", "bf16", "w4a4_lr"), ("w4a4 vs bf16", "bf16", "w4a4"), ("w4a4_gemm vs bf16", "bf16", "w4a4_gemm"),
    ("lr overhead", "w4a4_lr", "w4a4"), ("unfused overhead", "w4a4_unfused", "w4a4"),
    ("w4a4_old_gemm / w4a4_gemm", "w4a4_old_gemm", "w4a4_gemm"), ("w4a4_old / w4a4", "w4a4_old", "w4a4"), ("w8a8_gemm/int_mm", "w8a8_gemm", "int_mm"),
    ("w4a16 vs bf16", "bf16", "w4a16"),
    ("w4a8_pg_lr vs bf16", "bf16", "w4a8_pg_lr"), ("w4a8_pg vs bf16", "bf16", "w4a8_pg"), ("pg lr overhead", "w4a8_pg_lr", "w4a8_pg"),
    ("w8a8_fp8 vs bf16", "bf16", "w8a8_fp8"), ("torchao_fp8 vs bf16", "bf16", "torchao_fp8"),
    ("w8a8_fp8 / torchao_fp8", "torchao_fp8", "w8a8_fp8"),
]


def to_markdown(rows: list[dict], info: dict) -> str:
    cols = [m for m in METHODS if any(m in r["ms"] for r in rows)]
    ratios = [r for r in RATIOS if any(r[1] in row["ms"] and r[2] in row["ms"] for row in rows)]
    smi = info.get("nvidia_smi")
    clocks = (f"SM clock {smi.get('clocks.sm')} (max {smi.get('clocks.max.sm')}), memory clock {smi.get('clocks.mem')}"
              if isinstance(smi, dict) else "clocks unavailable")
    lines = [f"# dq kernel benchmark: {info['gpu']} (torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']})", "",
             f"Run {info['date']}; {clocks} at start. Latency in microseconds (TFLOP/s at 2MNK in parentheses); "
             "ratio columns divide the two times measured in this run (\"vs bf16\": speedup over bf16 F.linear).", "",
             "| model | layer | M | N | K | " + " | ".join(cols) + " | " + " | ".join(r[0] for r in ratios) + " |",
             "|" + "---|" * (len(cols) + len(ratios) + 5)]
    for r in rows:
        ms = r["ms"]
        flops = 2 * r["M"] * r["N"] * r["K"]
        cells = []
        for m in cols:
            t = ms.get(m)
            cells.append("" if t is None or t != t else f"{t * 1e3:.1f} ({flops / t / 1e9:.0f})")

        def ratio(a, b):
            ta, tb = ms.get(a), ms.get(b)
            return "" if not ta or not tb or ta != ta or tb != tb else f"{ta / tb:.2f}"

        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells)
                     + " | " + " | ".join(ratio(a, b) for _, a, b in ratios) + " |")
    return "\n".join(lines) + "\n"


CHECK_SHAPES = [(1, 96, 128), (5, 200, 192), (16, 520, 1024), (37, 200, 192), (300, 520, 1024), (4100, 3072, 3072)]


def check_correctness(shapes: list[tuple[int, int, int]] = CHECK_SHAPES, device: str = "cuda") -> list[str]:
    """GPU kernels vs the torch reference on odd shapes, activations rounded by the kernels' reciprocal rule
    (check_codes bounds where that differs from the reference's division); returns failure messages."""
    from dq.kernels.reference import quantized_linear_reference
    from dq.quant import PerChannel, PerGroup, PerToken, Progressive, QuantSpec, quantize, weight_scales
    from dq.quant.progressive import progressive_codes, progressive_scales
    from dq.quant.storage import encode_codes

    torch.manual_seed(0)
    dev, bf = torch.device(device), torch.bfloat16
    fails = []
    for (M, N, K) in shapes:
        for rank in (0, 32):
            x = torch.randn(M, K, device=dev, dtype=bf)
            b = torch.randn(N, device=dev, dtype=bf)
            sm = (torch.rand(K, device=dev) + 0.5).to(bf)
            ld = (torch.randn(rank, K, device=dev) * 0.05).to(bf) if rank else None
            lu = (torch.randn(N, rank, device=dev) * 0.05).to(bf) if rank else None
            w = torch.randn(N, K, device=dev)
            cases = []
            for wf, wspec, aspec, op in [
                ("int4", QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64)), "w4a4"),
                ("int4", QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64)), "w4a4_old"),
                ("int4", QuantSpec("int4", PerGroup(64)), QuantSpec("int8", PerToken()), "w4a8"),
                ("int4", QuantSpec("int4", PerGroup(64)), None, "w4a16"),
                ("int8", QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken()), "w8a8"),
                ("fp8_e4m3", QuantSpec("fp8_e4m3", PerChannel()), QuantSpec("fp8_e4m3", PerToken()), "fp8"),
                ("uint4", QuantSpec("uint4", Progressive(64), symmetric=False), QuantSpec("int8", PerToken()), "w4a8_pg"),
            ]:
                if op == "w4a8_pg":
                    s1, s2, z = progressive_scales(w, 64)
                    qw = encode_codes(progressive_codes(w, s1, s2, z), wf)
                    s2, z, s1 = s2.to(torch.uint8), z.to(torch.uint8), s1.half()
                    y = torch.ops.dq.w4a8_progressive_linear(x, qw, s2, z, s1, b, sm, ld, lu)
                    ref = quantized_linear_reference(x, qw, s2, z, b, weight_format=wf, in_features=K, act_spec=aspec, smooth=sm,
                                                     lora_down=ld, lora_up=lu, channel_scale=s1, act_rounding="reciprocal")
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    cases.append(f"{op}:{err:.1e}")
                    if not (err < 5e-3 and bool(torch.isfinite(y).all())):
                        fails.append(f"{op} M={M} N={N} K={K} rank={rank}: rel err {err:.3e}")
                    continue
                s, _ = weight_scales(w, wspec)
                qw = encode_codes(quantize(w, wspec, s).reshape(N, K), wf)
                sw = s.reshape(N, -1).half()
                if op in ("w4a4", "w4a8"):
                    y = torch.ops.dq.w4_linear(x, qw, sw, b, sm, ld, lu, 64, 4 if op == "w4a4" else 8)
                elif op == "w4a4_old":
                    from dq.kernels.w4a4_gemm import w4_linear

                    y = w4_linear(x, qw, sw, b, 64, 4, sm, ld, lu, mma8=False)
                elif op == "w4a16":
                    y = torch.ops.dq.w4a16_linear(x, qw, sw, b, sm, ld, lu, 64)
                else:
                    y = torch.ops.dq.w8a8_linear(x, qw, sw, b, sm, ld, lu)
                ref = quantized_linear_reference(x, qw, sw, None, b, weight_format=wf, in_features=K, act_spec=aspec,
                                                 smooth=sm, lora_down=ld, lora_up=lu, act_rounding="reciprocal")
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                ok = err < 5e-3 and bool(torch.isfinite(y).all())
                cases.append(f"{op}:{err:.1e}")
                if not ok:
                    fails.append(f"{op} M={M} N={N} K={K} rank={rank}: rel err {err:.3e}")
            print(f"check M={M} N={N} K={K} rank={rank}: " + " ".join(cases), flush=True)
    return fails


def check_mma8_sums(shapes=((70, 150, 192), (300, 520, 1024), (4100, 3072, 3072)), device: str = "cuda") -> list[str]:
    """The byte-code W4A4 GEMM with unit scales must return exact integer sums, in both MMA flavours and
    with both weight conversions: checks that the tensor cores take the e4m3 subnormals that encode
    weights 1..7 and keep every bit of the group sums (up to 64 * 8 * 15 before the offset correction)."""
    from dq.kernels.w4a4_mma8 import mma8_mode, offset_operands, w4a4_mma8_gemm
    from dq.quant import unpack_4bit

    torch.manual_seed(2)
    dev = torch.device(device)
    print(f"mma8_mode({dev}) = {mma8_mode(dev)}", flush=True)
    fails = []
    for M, N, K in shapes:
        codes = torch.randint(-8, 8, (M, K), device=dev)
        codes[:7] = -8
        codes[7:9] = 7
        b = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
        b[:3], b[3:6] = 0x77, 0x88
        ref = codes.double() @ unpack_4bit(b, True).double().t()
        line = [f"mma8 sums M={M} N={N} K={K}:"]
        for mode in ("fp8", "int8"):
            q, planes = offset_operands(codes, mode)
            for asm in (True, False) if dev.type == "cuda" else (False,):  # the CPU interpreter has no inline asm
                y = w4a4_mma8_gemm(q, planes, b, torch.ones(N, K // 64, device=dev), None, None, None, torch.float32, 64,
                                   use_asm=asm)
                bad = int((y.double() != ref).sum())
                line.append(f"{mode}/{'asm' if asm else 'plain'} mismatches {bad}/{M * N}")
                if bad:
                    fails.append(f"byte-code W4A4 integer sums differ at M={M} N={N} K={K} ({mode}, asm={asm}): {bad}")
        print(" ".join(line), flush=True)
    return fails


def check_codes(shapes=((37, 192), (300, 1024), (4100, 3072)), device: str = "cuda") -> list[str]:
    """Activation codes of the GPU quantizer vs the torch reference's division, on the same GPU.

    The kernels scale by reciprocal multiplication (dq.kernels.act_quant, "Scale rounding"): a code may differ
    from the reference's only where the reference's scaled value lies within 4 ulps of a rounding boundary.
    Reports how many codes differ, and fails on any that differs away from such a tie.
    """
    from dq.kernels.act_quant import FMT_INT4, FMT_INT4_FP8, FMT_INT8, quantize_activations

    torch.manual_seed(1)
    dev, bf = torch.device(device), torch.bfloat16
    tiny = torch.finfo(torch.float32).tiny
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)]).to(dev)
    fails = []
    for M, K in shapes:
        x = torch.randn(M, K, device=dev, dtype=bf)
        sm = (torch.rand(K, device=dev) + 0.5).to(bf)
        xs = (x / sm).float()
        line = [f"codes M={M} K={K}:"]

        def check(name: str, codes: torch.Tensor, group: int, qmax: float) -> None:
            g = xs.reshape(M, K // group, group)
            v = (g / (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=tiny)).reshape(M, K)
            ulp = torch.nextafter(v.abs(), torch.full_like(v, float("inf"))) - v.abs()
            code = lambda t: torch.clamp(torch.round(t), -qmax - 1, qmax)  # noqa: E731
            differ = codes != code(v)
            off_tie = int((differ & (code(v - 4 * ulp) == code(v + 4 * ulp))).sum())
            line.append(f"{name} {int(differ.sum())}/{M * K} differ ({off_tie} off a tie)")
            if off_tie:
                fails.append(f"{name} activation codes differ from the reference away from a rounding tie at M={M} K={K}: {off_tie}")

        q, _, _ = quantize_activations(x, FMT_INT4, 64, sm)
        check("int4", torch.stack([(q << 4).view(torch.int8) >> 4, q.view(torch.int8) >> 4], -1).reshape(M, K).float(), 64, 7.0)
        qf, _, _ = quantize_activations(x, FMT_INT4_FP8, 64, sm)
        check("int4-as-fp8", qf.float().reshape(M, K // 64, 64)[:, :, torch.argsort(perm)].reshape(M, K), 64, 7.0)
        q8, _, _ = quantize_activations(x, FMT_INT8, None, sm)
        check("int8", q8.float(), K, 127.0)
        print(" ".join(line), flush=True)
    return fails


def profile_w4a4(M: int, N: int, K: int) -> int:
    """One launch of each W4A4 GEMM (byte-code FP8 and INT8 flavours, unpacking INT8) inside a profiler
    range, after autotuning."""
    from dq.kernels.act_quant import FMT_INT4, FMT_INT4_FP8, FMT_INT4_I8, quantize_activations
    from dq.kernels.w4a4_gemm import w4_gemm
    from dq.kernels.w4a4_mma8 import w4a4_mma8_gemm

    dev, bf = torch.device("cuda"), torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=bf)
    q, s = _make_int4(N, K, dev)
    qf, sf, _ = quantize_activations(x, FMT_INT4_FP8, GROUP)
    qi, si, _ = quantize_activations(x, FMT_INT4_I8, GROUP)
    qa, sa, _ = quantize_activations(x, FMT_INT4, GROUP)
    calls = [lambda: w4a4_mma8_gemm(qf, sf, q, s, None, None, None, bf, GROUP),
             lambda: w4a4_mma8_gemm(qi, si, q, s, None, None, None, bf, GROUP),
             lambda: w4_gemm(qa, sa, q, s, None, None, None, bf, GROUP)]
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


# Static SASS model (no GPU needed): kernels compiled for sm_90 by Triton's bundled ptxas, main K-loop counted.
SM90_SMS, SM90_MHZ, SM90_MMA8_MACS = 132, 1980, 4096  # H200: SMs, max SM clock, dense 8-bit MACs / clk / SM
SM90_REGS, SM90_SMEM = 65536, 228 * 1024
SASS_VARIANTS = [  # (name, kernel module, kernel, activation dtype, extra constexprs, BLOCK_M, BLOCK_N, warps, stages)
    ("w4a4 unpacking INT8 (v1/v2)", "w4a4_gemm", "_w4_gemm_kernel", "u8", {"A_INT8": False}, 128, 128, 8, 3),
    ("w4a4 unpacking INT8 (v1/v2)", "w4a4_gemm", "_w4_gemm_kernel", "u8", {"A_INT8": False}, 128, 256, 8, 3),
    ("w4a4 byte-code FP8 (v3)", "w4a4_mma8", "_w4a4_mma8_kernel", "fp8e4nv", {"MMA_FP8": True}, 128, 128, 8, 4),
    ("w4a4 byte-code FP8 (v3)", "w4a4_mma8", "_w4a4_mma8_kernel", "fp8e4nv", {"MMA_FP8": True}, 128, 64, 4, 4),
    ("w4a4 byte-code FP8 (v3)", "w4a4_mma8", "_w4a4_mma8_kernel", "fp8e4nv", {"MMA_FP8": True}, 64, 128, 4, 4),
    ("w4a4 byte-code INT8 (v3)", "w4a4_mma8", "_w4a4_mma8_kernel", "i8", {"MMA_FP8": False}, 128, 128, 8, 4),
    ("w4a4 byte-code FP8, no inline PTX", "w4a4_mma8", "_w4a4_mma8_kernel", "fp8e4nv",
     {"MMA_FP8": True, "USE_ASM": False}, 128, 128, 8, 4),
    ("w8a8 INT8 (BLOCK_K 128)", "w8a8_gemm", "_w8_gemm_kernel", "i8", {"IS_FP8": False, "EVEN_K": True, "BLOCK_K": 128},
     128, 256, 8, 3),
    ("w8a8 INT8 (BLOCK_K 128)", "w8a8_gemm", "_w8_gemm_kernel", "i8", {"IS_FP8": False, "EVEN_K": True, "BLOCK_K": 128},
     128, 128, 8, 4),
]


def _compile_sm90(module: str, kernel: str, a_type: str, extra: dict, bm: int, bn: int, warps: int, stages: int):
    """Compile one kernel of dq.kernels for sm_90 (bf16 output, bias + rank-32 low-rank epilogue)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"dq.kernels.{module}"), kernel)
    ptr_types = {"a_ptr": a_type, "as_ptr": "fp32", "b_ptr": "u8" if module != "w8a8_gemm" else a_type, "bs_ptr": "fp16",
                 "bias_ptr": "bf16", "la_ptr": "fp32", "lu_ptr": "bf16", "c_ptr": "bf16"}
    consts = {"GROUP": 64, "A_INT8": False, "MMA_FP8": True, "USE_ASM": True, "SCALED": True, "HAS_BIAS": True,
              "HAS_LORA": True, "R_PAD": 32, "UPCAST": False, "BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, **extra}
    sig, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in ptr_types:
            sig[name] = "*" + ptr_types[name]
        elif param.is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
        if sig[name] != "constexpr" and name != "LA_SPLITS":
            attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton specializes for aligned tensors / strides
    consts = {k: v for k, v in consts.items() if k in sig and sig[k] == "constexpr"}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _sass_loop(cubin: bytes) -> dict:
    """Registers, shared memory and the instruction mix of the loop around the first tensor-core MMA."""
    import glob
    import re
    import tempfile

    import triton

    tool = glob.glob(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))[0]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", res)}
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    mma = next(i for i, (_, t) in enumerate(ins) if re.search(r"\b[IHQ]GMMA", t))
    for j in range(mma, len(ins)):
        m = re.search(r"BRA (0x[0-9a-f]+)", ins[j][1])
        if m and int(m.group(1), 16) <= ins[mma][0]:
            start = next(i for i, (a, _) in enumerate(ins) if a == int(m.group(1), 16))
            break
    ops: dict[str, int] = {}
    for _, t in ins[start:j + 1]:
        op = t.split()[1] if t.startswith("@") else t.split()[0]
        op = op.split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return {"regs": usage.get("REG"), "local_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0), "loop_instructions": j + 1 - start,
            "loop_mix": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def sass_report(out: str, measured: str | None) -> int:
    """Static model of the W4A4 kernels on sm_90: SASS per K-group, issue- and MMA-bound times at FLUX ff_in."""
    M, N, K = 4096, 12288, 3072
    meas = {}
    if measured and Path(measured).exists():
        for r in json.loads(Path(measured).read_text())["rows"]:
            if (r["M"], r["N"], r["K"]) == (M, N, K):
                meas = r["ms"]
    rows = []
    for name, module, kernel, a_type, extra, bm, bn, warps, stages in SASS_VARIANTS:
        ck = _compile_sm90(module, kernel, a_type, extra, bm, bn, warps, stages)
        info = _sass_loop(ck.asm["cubin"])
        bk = extra.get("BLOCK_K", 64)
        smem = ck.metadata.shared
        ctas = max(1, min(SM90_REGS // (((info["regs"] + 7) // 8 * 8) * 32 * warps), SM90_SMEM // max(smem, 1), 64 // warps))
        per_group = info["loop_instructions"] * 64 / bk  # per thread per 64 of K
        issue = per_group * warps / 4 / (bm * bn / 16384)  # SM clocks per 128x128x64 block of work, 4 schedulers
        mma = 128 * 128 * 64 / SM90_MMA8_MACS
        blocks = (M / 128) * (N / 128) * (K / 64) / SM90_SMS
        rows.append({"variant": name, "tile": f"{bm}x{bn}", "warps": warps, "stages": stages, "ctas_per_sm": ctas,
                     "shared_bytes": smem, **info, "instr_per_thread_per_group": per_group,
                     "issue_clk_per_128x128x64": issue, "mma_clk_per_128x128x64": mma,
                     "ff_in_us_issue_bound": blocks * issue / SM90_MHZ, "ff_in_us_mma_bound": blocks * mma / SM90_MHZ})
        print(f"{name} {bm}x{bn}/{warps}w/{stages}s: {info['loop_instructions']} instr/iter, regs {info['regs']}, "
              f"local {info['local_bytes']} B, issue-bound {rows[-1]['ff_in_us_issue_bound']:.0f} us", flush=True)
    lines = ["# W4A4 kernels on sm_90: static SASS model (no GPU: compiled by Triton's ptxas, not run)", "",
             f"Triton {__import__('triton').__version__} compiling for sm_90 (the H200 runs Triton 3.6: its SASS can differ). "
             "Counts are SASS instructions in the main K-loop per thread; 'issue' = loop instructions x warps / 4 schedulers, "
             "per 128x128x64 block of output work; 'MMA' = the same block at the dense 8-bit tensor-core rate "
             f"({SM90_MMA8_MACS} MAC/clk/SM). Times: FLUX ff_in M={M} N={N} K={K} on {SM90_SMS} SMs at {SM90_MHZ} MHz "
             "(a kernel takes at least max(issue, MMA), at most about their sum plus memory stalls).", "",
             "| variant | tile | warps | stages | regs | stack+local B | CTAs/SM | loop instr / group | FFMA | LDG | issue clk | MMA clk "
             "| ff_in issue-bound us | ff_in MMA-bound us |", "|" + "---|" * 14]
    for r in rows:
        mix = r["loop_mix"]
        lines.append(f"| {r['variant']} | {r['tile']} | {r['warps']} | {r['stages']} | {r['regs']} | {r['local_bytes']} | "
                     f"{r['ctas_per_sm']} | {r['instr_per_thread_per_group']:.0f} | {mix.get('FFMA', 0)} | {mix.get('LDG', 0)} | "
                     f"{r['issue_clk_per_128x128x64']:.0f} | {r['mma_clk_per_128x128x64']:.0f} | "
                     f"{r['ff_in_us_issue_bound']:.0f} | {r['ff_in_us_mma_bound']:.0f} |")
    if meas:
        lines += ["", f"Measured on the H200 at this shape ({Path(measured).name}, the v1 kernels): "
                  + ", ".join(f"{k} {v * 1e3:.0f} us" for k, v in meas.items() if k in ("bf16", "w4a4_gemm", "w8a8_gemm",
                                                                                       "scaled_mm_fp8", "int_mm"))
                  + ". w4a4_gemm there is the unpacking INT8 kernel, w8a8_gemm the INT8 one above."]
    lines += ["", "Loop instruction mix per variant:", ""]
    lines += [f"- {r['variant']} {r['tile']}: " + ", ".join(f"{k} {v}" for k, v in list(r["loop_mix"].items())[:12]) for r in rows]
    md = "\n".join(lines) + "\n"
    Path(out).with_suffix(".json").write_text(json.dumps({"triton": __import__("triton").__version__, "target": "sm_90",
                                                          "shape": [M, N, K], "measured_ms": meas, "rows": rows}, indent=1))
    Path(out).with_suffix(".md").write_text(md)
    print(md)
    return 0


TUNE_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072)]  # FLUX: attention, ff in/out, single qkv+mlp
TUNE_M = {"skinny": 16, "small": 256, "medium": 2048, "large": 8192}


def tune(out_dir: str) -> dict:
    """Time each choice of dq.kernels.tuned per shape class on this GPU (FLUX layer shapes, whole layers with
    their activation quantization) and write the table `<out_dir>/<gpu>.json`; returns it."""
    import triton

    from dq.kernels import tuned
    from dq.kernels.w8a8_gemm import w8a8_linear

    dev, bf = torch.device("cuda"), torch.bfloat16
    measured: dict[str, dict[str, float]] = {}
    choices: dict[str, dict[str, str]] = {"w8a8_fp8": {}}
    for cls, M in TUNE_M.items():
        totals = dict.fromkeys(tuned.CHOICES["w8a8_fp8"], 0.0)
        for N, K in TUNE_SHAPES:
            x = torch.randn(M, K, device=dev, dtype=bf)
            bias = torch.randn(N, device=dev, dtype=bf)
            wf = [torch.randn(N, K, device=dev).to(torch.float8_e4m3fn) for _ in range(_copies(N * K + M * K))]
            sw = (torch.rand(N, 1, device=dev) * 0.01).half()
            for backend in totals:
                ms = _graph_time([lambda w=w: w8a8_linear(x, w, sw, bias, backend=backend) for w in wf], 16)
                totals[backend] += ms
                measured[f"w8a8_fp8/{backend}/M={M}/N={N}/K={K}"] = ms * 1e3
        choices["w8a8_fp8"][cls] = min(totals, key=totals.get)
        print(f"tune w8a8_fp8 {cls} (M={M}): " + ", ".join(f"{b} {t * 1e3:.0f} us" for b, t in totals.items()), flush=True)
    name = torch.cuda.get_device_name()
    result = {"gpu": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
              "choices": choices, "measured_us": measured}
    path = Path(out_dir) / f"{tuned.gpu_slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark dq's quantized linear kernels against torch baselines.")
    p.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="token counts M (comma-separated)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to time")
    p.add_argument("--quick", action="store_true", help="FLUX shapes at M=16 and 4096 only")
    p.add_argument("--layers", default="", help="comma-separated layer names to keep (default: all)")
    p.add_argument("--check-shapes", default="", help="correctness-check shapes 'M,N,K;M,N,K' (default: CHECK_SHAPES)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_h200"),
                   help="output path without extension (.json and .md are written)")
    p.add_argument("--profile", default="", help="'M,N,K': run the W4A4 GEMMs once each between cudaProfilerStart/Stop "
                   "(after autotuning) for `ncu --profile-from-start off`, and exit")
    p.add_argument("--sass", action="store_true", help="no GPU needed: compile the W4A4 kernels for sm_90 and write "
                   "the static SASS model (loop instruction counts, issue- and MMA-bound times) to --out")
    p.add_argument("--tune", default="", help="DIR: measure the kernel choices of dq.kernels.tuned on this GPU, write "
                   "DIR/<gpu>.json (commit it to dq/kernels/tuned/) and exit")
    args = p.parse_args(argv)
    if args.sass:
        return sass_report(args.out, str(Path(__file__).parent / "results" / "kernels_h200.json"))
    if not torch.cuda.is_available():
        print("dq bench kernels needs a CUDA GPU (the CPU runs only the torch reference).", file=sys.stderr)
        return 2
    if args.profile:
        return profile_w4a4(*(int(v) for v in args.profile.split(",")))
    if args.tune:
        tune(args.tune)
        return 0
    info = env_info()
    print(json.dumps(info), flush=True)
    shapes = [tuple(int(v) for v in t.split(",")) for t in args.check_shapes.split(";")] if args.check_shapes else CHECK_SHAPES
    fails = [] if args.no_check else check_codes() + check_mma8_sums() + check_correctness(shapes)
    models = ["flux"] if args.quick else args.models.split(",")
    ms_list = [16, 4096] if args.quick else [int(m) for m in args.m.split(",")]
    methods = set(args.methods.split(","))
    rows = []
    t0 = time.time()
    for model in models:
        for layer, N, K in SHAPES[model]:
            if args.layers and layer not in args.layers.split(","):
                continue
            for M in ms_list:
                r = {"model": model, "layer": layer, "M": M, "N": N, "K": K, "ms": bench_shape(M, N, K, methods)}
                rows.append(r)
                print(f"[{time.time() - t0:.0f}s] {model} {layer} M={M}: "
                      + " ".join(f"{k}={v * 1e3:.1f}us" for k, v in r["ms"].items()), flush=True)
                _write(args.out, info, fails, rows, to_markdown(rows, info))
    from dq.kernels.tuning import chosen_configs

    info["autotuned"] = chosen_configs()
    print(json.dumps(info["autotuned"], indent=1))
    md = to_markdown(rows, info)
    print(md)
    _write(args.out, info, fails, rows, md)
    return 1 if fails else 0


def _write(path: str, info: dict, fails: list[str], rows: list[dict], md: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": info, "check_failures": fails, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(md + ("\nCorrectness check failures:\n" + "\n".join(fails) if fails else "\nCorrectness check vs torch reference: all passed.\n"))


if __name__ == "__main__":
    sys.exit(main())
