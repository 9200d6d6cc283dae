"""Triton kernels under TRITON_INTERPRET=1 (CPU) against the torch reference, on small odd shapes.

Integer GEMM sums must match exactly. Activation codes and scales must equal the kernels' documented
reciprocal rule exactly (dq.kernels.act_quant, "Scale rounding"), and differ from the reference's division
only where the reference's scaled value lies within 4 ulps of a rounding boundary. Float outputs within
rel. Frobenius error 1e-5 (fp32) or 4e-3 (bf16: output rounding + bf16 low-rank intermediate).
"""

import pytest
import torch

from dq.errors import DQError
from dq.kernels import tuning
from dq.kernels.act_quant import FMT_FP8, FMT_INT4, FMT_INT4_FP8, FMT_INT4_I8, FMT_INT8, quantize_activations
from dq.kernels.reference import quantized_linear_reference
from dq.kernels.w4a4_gemm import w4_gemm, w4_linear
from dq.kernels.w4a4_mma8 import mma8_mode, offset_operands, self_check, w4a4_mma8_gemm, w4a4_mma8_linear
from dq.kernels.w4a8_progressive import w4a8_progressive_gemm, w4a8_progressive_linear
from dq.kernels.w4a16_gemm import w4a16_linear
from dq.kernels.w8a8_gemm import w8a8_linear
from dq.quant import PerChannel, PerGroup, PerToken, QuantSpec, fake_quantize, pack_4bit, quantize, unpack_4bit, weight_scales
from dq.quant.progressive import int8_weight, progressive_codes, progressive_scales
from dq.quant.storage import encode_codes


def w4a4_linear(x, qweight, weight_scale, bias, group_size, *rest):
    return w4_linear(x, qweight, weight_scale, bias, group_size, 4, *rest)


def w4a8_linear(x, qweight, weight_scale, bias, group_size, *rest):
    return w4_linear(x, qweight, weight_scale, bias, group_size, 8, *rest)


# tests/conftest.py sets TRITON_INTERPRET=1 before dq.kernels is imported, so these run on the CPU.


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def linear_inputs(M, N, K, rank, dtype=torch.bfloat16):
    """Random x [M, K], bias [N], smoothing [K] and rank-`rank` low-rank factors (None for rank 0)."""
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype)
    sm = (torch.rand(K) + 0.5).to(dtype)
    ld = (torch.randn(rank, K) * 0.1).to(dtype) if rank else None
    lu = (torch.randn(N, rank) * 0.1).to(dtype) if rank else None
    return x, b, sm, ld, lu


def make_weight(N, K, spec, fmt):
    w = torch.randn(N, K)
    s, _ = weight_scales(w, spec)
    return encode_codes(quantize(w, spec, s).reshape(N, K), fmt), s.reshape(N, -1).half()


def make_progressive_weight(N, K, group=64):
    """(packed UINT4 codes, s2, z uint8 [N, K/G], s1 fp16 [N, 1]) of a random weight, as a deployed layer stores them."""
    w = torch.randn(N, K) * (torch.rand(N, 1) + 0.1)
    s1, s2, z = progressive_scales(w, group)
    return encode_codes(progressive_codes(w, s1, s2, z), "uint4"), s2.to(torch.uint8), z.to(torch.uint8), s1.half()


TINY = torch.finfo(torch.float32).tiny


def reciprocal_rule(xs: torch.Tensor, group: int, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled values [M, K], scales [M, K/G]) as the kernels compute them: s = max(amax * fl(1/qmax), tiny),
    v = x * fl(1/s)."""
    M, K = xs.shape
    g = xs.float().reshape(M, K // group, group)
    s = (g.abs().amax(-1) * torch.tensor(1 / qmax, dtype=torch.float32)).clamp(min=TINY)
    return (g * (1 / s)[..., None]).reshape(M, K), s


def division_rule(xs: torch.Tensor, group: int, qmax: float) -> torch.Tensor:
    """The reference's scaled values: x / (amax / qmax), both divisions correctly rounded (CPU torch)."""
    M, K = xs.shape
    g = xs.float().reshape(M, K // group, group)
    return (g / (g.abs().amax(-1) / qmax).clamp(min=TINY)[..., None]).reshape(M, K)


def int_codes(qmax: float):
    return lambda v: torch.clamp(torch.round(v), -qmax - 1, qmax)


def fp8_codes(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-448, 448).to(torch.float8_e4m3fn).float()


def assert_codes_differ_only_at_ties(codes: torch.Tensor, v_ref: torch.Tensor, code_fn) -> int:
    """codes equal code_fn(v_ref) except where a rounding boundary lies within 4 ulps of v_ref, and there take
    the code of one side of it. Returns how many differ."""
    ulp = torch.nextafter(v_ref.abs(), torch.tensor(float("inf"))) - v_ref.abs()
    below, above = code_fn(v_ref - 4 * ulp), code_fn(v_ref + 4 * ulp)
    differ = codes != code_fn(v_ref)
    assert not (differ & (below == above)).any(), "a code differs from the reference away from a rounding tie"
    assert ((codes == below) | (codes == above))[differ].all()
    return int(differ.sum())


@pytest.mark.parametrize("M,K", [(1, 64), (19, 192)])
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_int4_exact(M, K, smooth):
    torch.manual_seed(M + K)
    x = torch.randn(M, K).bfloat16()
    sm = (torch.rand(K) + 0.5).bfloat16() if smooth else None
    q, s, _ = quantize_activations(x, FMT_INT4, 64, sm)
    xs = x / sm if smooth else x
    v, rule_s = reciprocal_rule(xs, 64, 7.0)
    assert torch.equal(s, rule_s.t().contiguous())
    assert torch.equal(q, pack_4bit(int_codes(7.0)(v).to(torch.int16)))
    codes = torch.stack([(q << 4).view(torch.int8) >> 4, q.view(torch.int8) >> 4], -1).reshape(M, K).float()
    assert_codes_differ_only_at_ties(codes, division_rule(xs, 64, 7.0), int_codes(7.0))


@pytest.mark.parametrize("fmt,qmax,code_fn", [(FMT_INT8, 127.0, int_codes(127.0)), (FMT_FP8, 448.0, fp8_codes)])
def test_act_quant_8bit_exact(fmt, qmax, code_fn):
    torch.manual_seed(1)
    x = torch.randn(21, 150) * 3
    q, s, _ = quantize_activations(x, fmt, None)
    v, rule_s = reciprocal_rule(x, 150, qmax)
    assert torch.equal(s.reshape(-1), rule_s.reshape(-1))
    assert torch.equal(q.float(), code_fn(v))
    assert_codes_differ_only_at_ties(q.float(), division_rule(x, 150, qmax), code_fn)


def test_act_quant_lowrank():
    torch.manual_seed(2)
    x, ld = torch.randn(17, 128), torch.randn(20, 128)
    sm = torch.rand(128) + 0.5
    _, _, la = quantize_activations(x, FMT_INT4, 64, sm, ld)
    assert la.dim() == 3 and la.dtype == torch.float32
    assert rel(la.sum(0), (x / sm) @ ld.t()) < 1e-5


def test_w4a4_integer_sums_exact():
    torch.manual_seed(3)
    M, N, K = 23, 40, 192
    a = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8)
    b = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    ones_a, ones_b = torch.ones(K // 64, M), torch.ones(N, K // 64)
    y = w4_gemm(a, ones_a, b, ones_b, None, None, None, torch.float32, 64)
    from dq.quant import unpack_4bit

    ref = unpack_4bit(a, True).long() @ unpack_4bit(b, True).long().t()
    assert torch.equal(y, ref.float())


CASES = [(1, 32, 64, 0), (37, 50, 192, 0), (37, 50, 192, 20), (16, 33, 128, 32)]


# W4A16 is weight-only: it takes 16-bit activations, so it has no float32 case.
KIND_DTYPES = [(k, d) for k in ("w4a4", "w4a8", "w4a8pg", "w4a16", "w8a8", "fp8") for d in (torch.float32, torch.bfloat16)
               if not (k == "w4a16" and d == torch.float32)]


@pytest.mark.parametrize("M,N,K,rank", CASES)
@pytest.mark.parametrize("kind,dtype", KIND_DTYPES)
def test_linear_matches_reference(kind, dtype, M, N, K, rank):
    torch.manual_seed(M * N + K + rank)
    x, b, sm, ld, lu = linear_inputs(M, N, K, rank, dtype)
    channel = None
    if kind == "w4a8pg":
        qw, sw, zero, channel = make_progressive_weight(N, K, 32 if K % 64 else 64)
        y = w4a8_progressive_linear(x, qw, sw, zero, channel, b, sm, ld, lu)
        wf, act = "uint4", QuantSpec("int8", PerToken())
    elif kind in ("w4a4", "w4a8", "w4a16"):
        qw, sw = make_weight(N, K, QuantSpec("int4", PerGroup(64)), "int4")
        fn = {"w4a4": w4a4_linear, "w4a8": w4a8_linear, "w4a16": w4a16_linear}[kind]
        y = fn(x, qw, sw, b, 64, sm, ld, lu)
        wf = "int4"
        act = {"w4a4": QuantSpec("int4", PerToken(64)), "w4a8": QuantSpec("int8", PerToken()), "w4a16": None}[kind]
    else:
        wf = "int8" if kind == "w8a8" else "fp8_e4m3"
        qw, sw = make_weight(N, K, QuantSpec(wf, PerChannel()), wf)
        y = w8a8_linear(x, qw, sw, b, sm, ld, lu)
        act = QuantSpec(wf, PerToken())
    ref = quantized_linear_reference(x, qw, sw, zero if channel is not None else None, b, weight_format=wf, in_features=K,
                                     act_spec=act, smooth=sm, lora_down=ld, lora_up=lu, channel_scale=channel,
                                     act_rounding="reciprocal")
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("tile", tuning.gpu_tiles("w4a8_progressive"))
def test_w4a8_progressive_integer_sums_exact(tile):
    """Unit activation and channel scales: the output is the exact integer sum of codes times (u - z) * s2,
    over every tile the autotuner can pick, with the INT8 operand at its extremes (+-120)."""
    torch.manual_seed(5)
    M, N, K = 70, 150, 256
    qw, s2, z, _ = make_progressive_weight(N, K)
    qw[:2], s2[:2], z[:2] = 0xFF, 8, 0  # (15 - 0) * 8 = 120
    qw[2:4], s2[2:4], z[2:4] = 0x00, 8, 15  # (0 - 15) * 8 = -120
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    a[:3] = -128
    w8 = int8_weight(unpack_4bit(qw, False), s2, z)
    assert 120 <= w8.abs().max() <= 127
    y = w4a8_progressive_gemm(a, torch.ones(1, M), qw, s2, z, torch.ones(N, 1), None, None, None, torch.float32, tile=tuning.Tile(*tile))
    assert torch.equal(y.double(), (a.double() @ w8.double().t()))


def test_w4a8_progressive_bad_inputs_raise():
    qw, s2, z, s1 = make_progressive_weight(8, 128)
    a = torch.zeros(4, 128, dtype=torch.int8)
    ones = torch.ones(1, 4)
    with pytest.raises(DQError, match="uint8"):
        w4a8_progressive_gemm(a, ones, qw, s2.half(), z, s1, None, None, None, torch.float32)
    with pytest.raises(DQError, match="powers of two"):
        small_s2, small_z = torch.ones(8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)  # groups of 16
        w4a8_progressive_gemm(a, ones, qw, small_s2, small_z, s1, None, None, None, torch.float32)
    with pytest.raises(DQError, match="int8"):
        w4a8_progressive_gemm(a.float(), ones, qw, s2, z, s1, None, None, None, torch.float32)


@pytest.mark.parametrize("rank", [0, 20])
def test_fp8_through_scaled_mm_matches_reference(rank):
    """The FP8 layer with its GEMM in torch._scaled_mm (the CPU build here, cuBLAS on a GPU) after the fused
    quantizer: within the bf16 tolerance of the reference, as the Triton GEMM."""
    torch.manual_seed(rank)
    M, N, K = 37, 48, 192
    x, b, sm, ld, lu = linear_inputs(M, N, K, rank)
    qw, sw = make_weight(N, K, QuantSpec("fp8_e4m3", PerChannel()), "fp8_e4m3")
    ref = quantized_linear_reference(x, qw, sw, None, b, weight_format="fp8_e4m3", in_features=K, act_spec=QuantSpec("fp8_e4m3", PerToken()),
                                     smooth=sm, lora_down=ld, lora_up=lu, act_rounding="reciprocal")
    for backend in ("scaled_mm", "triton"):
        y = w8a8_linear(x, qw, sw, b, sm, ld, lu, backend=backend)
        assert y.dtype == torch.bfloat16 and rel(y, ref) < 4e-3, backend
    with pytest.raises(DQError, match="backend"):
        w8a8_linear(x, qw, sw, b, backend="cublas")


def test_tuned_tables_decide_and_the_heuristic_fills_in(tmp_path, monkeypatch):
    from dq.kernels import tuned

    assert [tuned.shape_class(m) for m in (1, 16, 17, 512, 4096, 4097)] == ["skinny", "skinny", "small", "small", "medium", "large"]
    assert tuned.gpu_slug("NVIDIA H200") == "nvidia-h200"
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    tuned.table.cache_clear()
    (tmp_path / "nvidia-h200.json").write_text('{"gpu": "NVIDIA H200", "choices": {"w8a8_fp8": {"large": "triton"}}}')
    try:
        assert tuned.choose("w8a8_fp8", "NVIDIA H200", 8192) == "triton"  # measured
        assert tuned.choose("w8a8_fp8", "NVIDIA H200", 1024) == "scaled_mm"  # not measured: the heuristic
        assert tuned.choose("w8a8_fp8", "NVIDIA L40S", 8) == "triton" and tuned.choose("w8a8_fp8", "NVIDIA L40S", 8192) == "scaled_mm"
    finally:
        tuned.table.cache_clear()


def test_bad_inputs_raise():
    qw, sw = make_weight(8, 128, QuantSpec("int4", PerGroup(64)), "int4")
    with pytest.raises(DQError):
        quantize_activations(torch.randn(4, 100), FMT_INT4, 64)  # K not a multiple of the group
    with pytest.raises(DQError):
        quantize_activations(torch.randn(4, 128).to(torch.int32), FMT_INT8, None)
    with pytest.raises(DQError):
        w4a4_linear(torch.randn(4, 128), qw, sw[:, :1], None, 64)  # scales do not match the groups
    with pytest.raises(DQError):
        w4a16_linear(torch.randn(4, 128), qw, sw, None, 64)  # fp32 activations


def test_dispatcher_cpu_uses_reference():
    from dq.kernels import quantized_linear

    qw, sw = make_weight(8, 128, QuantSpec("int4", PerGroup(64)), "int4")
    x = torch.randn(2, 3, 128)
    y = quantized_linear(x, qw, sw, None, None, weight_format="int4", in_features=128,
                         act_spec=QuantSpec("int4", PerToken(64)))
    assert y.shape == (2, 3, 8)
    z = torch.ops.dq.w4_linear(x.reshape(6, 128), qw, sw, None, None, None, None, 64, 4)
    assert torch.equal(y.reshape(6, 8), z)


def _int4_act_codes(xs: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [M, K] and [M, K/G] scales of the kernels' reciprocal rule."""
    v, s = reciprocal_rule(xs, group, 7.0)
    return int_codes(7.0)(v), s


# (BLOCK_M, TILE_G, chunks, num_warps): the GPU plans (int4_plan on an H200) and odd splits of K.
PLANS = [(16, 2, 1, 4), (16, 8, 1, 4), (32, 4, 3, 8), (16, 1, 7, 4), (32, 8, 2, 8)]


@pytest.mark.parametrize("plan", PLANS)
def test_act_quant_int4_plans_exact(plan):
    """Every tiling of the INT4 quantizer gives the rule's codes, scales and lora partials (odd M, K)."""
    torch.manual_seed(sum(plan))
    M, K, R = 37, 448, 20
    x = torch.randn(M, K).bfloat16()
    sm = (torch.rand(K) + 0.5).bfloat16()
    ld = (torch.randn(R, K) * 0.1).bfloat16()
    q, s, la = quantize_activations(x, FMT_INT4, 64, sm, ld, plan=plan)
    codes, ref_s = _int4_act_codes(x / sm, 64)
    assert torch.equal(s, ref_s.t().contiguous())
    assert torch.equal(q, pack_4bit(codes.to(torch.int16)))
    assert rel(la.sum(0), ((x / sm).float() @ ld.float().t())) < 1e-5


def test_reciprocal_codes_differ_from_the_division_only_at_ties():
    """On 64k bf16 activations some codes do differ from the reference's division (so the bound is not
    vacuous), each at a rounding tie; the dequantized values stay within one step of fake_quantize's."""
    torch.manual_seed(5)
    x = torch.randn(64, 1024).bfloat16()
    q, s, _ = quantize_activations(x, FMT_INT4, 64)
    codes = torch.stack([(q << 4).view(torch.int8) >> 4, q.view(torch.int8) >> 4], -1).reshape(64, 1024).float()
    assert assert_codes_differ_only_at_ties(codes, division_rule(x, 64, 7.0), int_codes(7.0)) > 0
    ref = fake_quantize(x.float(), QuantSpec("int4", PerToken(64)))
    step = s.t().repeat_interleave(64, 1)
    assert ((codes * step - ref).abs() <= step * 1.0001).all()


GPU_CASES = [(37, 200, 192, 0), (70, 136, 320, 20)]
W4_TILES = [("w4a4", t) for t in tuning.gpu_tiles("w4")] + [("w4a8", (16, 64)), ("w4a8", (128, 256))]


@pytest.mark.parametrize("kind,tile", W4_TILES)
@pytest.mark.parametrize("M,N,K,rank", GPU_CASES)
def test_w4_gemm_gpu_tiles(kind, tile, M, N, K, rank):
    """The W4A4/W4A8 GEMM at every tile the H200 autotuner can pick (M, N, K not multiples of it)."""
    torch.manual_seed(M + N + K + rank + tile[0])
    x, b, sm, ld, lu = linear_inputs(M, N, K, rank)
    qw, sw = make_weight(N, K, QuantSpec("int4", PerGroup(64)), "int4")
    act = QuantSpec("int4", PerToken(64)) if kind == "w4a4" else QuantSpec("int8", PerToken())
    # W4A4 here is the unpacking INT8 kernel (the fallback); the byte-code kernel has its own tile tests below.
    y = w4_linear(x, qw, sw, b, 64, 4 if kind == "w4a4" else 8, sm, ld, lu, mma8=False, tile=tuning.Tile(*tile))
    ref = quantized_linear_reference(x, qw, sw, None, b, weight_format="int4", in_features=K, act_spec=act,
                                     smooth=sm, lora_down=ld, lora_up=lu, act_rounding="reciprocal")
    assert rel(y, ref) < 4e-3


@pytest.mark.parametrize("tile", [(16, 64), (64, 128), (128, 256)])
def test_w4_integer_sums_gpu_tiles(tile):
    """Raw integer sums at the GPU tiles: exact (any unpack/layout slip shows as a mismatch)."""
    torch.manual_seed(tile[0])
    M, N, K = 70, 150, 192
    a = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8)
    b = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    y = w4_gemm(a, torch.ones(K // 64, M), b, torch.ones(N, K // 64), None, None, None, torch.float32, 64, tuning.Tile(*tile))
    from dq.quant import unpack_4bit

    assert torch.equal(y, (unpack_4bit(a, True).long() @ unpack_4bit(b, True).long().t()).float())


@pytest.mark.parametrize("tile,rank", [(t, 20 if i % 2 else 0) for i, t in enumerate(tuning.gpu_tiles("w8"))])
def test_w8_gemm_gpu_tiles(tile, rank):
    torch.manual_seed(tile[1] + rank)
    M, N, K = 37, 150, 320
    x, _, _, ld, lu = linear_inputs(M, N, K, rank)
    qw, sw = make_weight(N, K, QuantSpec("int8", PerChannel()), "int8")
    y = w8a8_linear(x, qw, sw, None, None, ld, lu, tile=tuning.Tile(*tile, block_k=128))
    ref = quantized_linear_reference(x, qw, sw, None, None, weight_format="int8", in_features=K,
                                     act_spec=QuantSpec("int8", PerToken()), lora_down=ld, lora_up=lu, act_rounding="reciprocal")
    assert rel(y, ref) < 4e-3


@pytest.mark.parametrize("M,plan,rank", [(1, (32, 1), 0), (1, (32, 3), 20), (5, (64, 5), 0), (16, (32, 3), 0),
                                         (16, (64, 15), 20)])
def test_w4a16_small_m_splitk(M, plan, rank):
    """The split-K GEMV path (M <= 16) for several (BLOCK_N, groups/program), N not a multiple of BLOCK_N."""
    torch.manual_seed(M + plan[1] + rank)
    N, K = 90, 960  # 15 groups of 64
    x, b, _, ld, lu = linear_inputs(M, N, K, rank)
    qw, sw = make_weight(N, K, QuantSpec("int4", PerGroup(64)), "int4")
    y = w4a16_linear(x, qw, sw, b, 64, None, ld, lu, small_m=True, splitk_plan_override=plan)
    ref = quantized_linear_reference(x, qw, sw, None, b, weight_format="int4", in_features=K, act_spec=None,
                                     lora_down=ld, lora_up=lu)
    assert y.shape == (M, N) and rel(y, ref) < 4e-3


def test_splitk_plan_fills_gpu():
    from dq.kernels.w4a16_gemm import splitk_plan

    bn, gpp = splitk_plan(3072, 48, 132)
    assert 48 % gpp == 0 and (3072 // bn) * (48 // gpp) >= 4 * 132
    assert splitk_plan(320, 5, 132) == (32, 1)


# --- W4A4 on 8-bit tensor cores (dq.kernels.w4a4_mma8): byte activation codes, offset-encoded weights ---


_PERM = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])  # a group's (even k, odd k) order
MODES = ["fp8", "int8"]


@pytest.mark.parametrize("plan", [(16, 2, 1, 4), (32, 4, 3, 8), (16, 1, 7, 4)])
@pytest.mark.parametrize("fmt", [FMT_INT4_FP8, FMT_INT4_I8])
def test_act_quant_int4_bytes_exact(plan, fmt):
    """Byte-coded INT4: codes equal the rule's (group-permuted), planes are (f * scale,
    8 * sum(codes) * scale) with f = 512 (e4m3) or 1 (int8), lora partials as for the packed layout."""
    torch.manual_seed(sum(plan) + fmt)
    M, K, R = 37, 448, 20
    x = torch.randn(M, K).bfloat16()
    sm = (torch.rand(K) + 0.5).bfloat16()
    ld = (torch.randn(R, K) * 0.1).bfloat16()
    q, s, la = quantize_activations(x, fmt, 64, sm, ld, plan=plan)
    codes, ref_s = _int4_act_codes(x / sm, 64)
    G = K // 64
    assert q.dtype == (torch.float8_e4m3fn if fmt == FMT_INT4_FP8 else torch.int8)
    assert q.shape == (M, K) and s.shape == (2, G, 256)
    assert torch.equal(q.float(), codes.reshape(M, G, 64)[:, :, _PERM].reshape(M, K))
    assert torch.equal(s[0, :, :M], ref_s.t() * (512 if fmt == FMT_INT4_FP8 else 1))
    assert torch.equal(s[1, :, :M], (8 * codes.reshape(M, G, 64).sum(-1) * ref_s).t())
    assert rel(la.sum(0), ((x / sm).float() @ ld.float().t())) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tile", tuning.gpu_tiles("w4a4_mma8"))
def test_w4a4_mma8_integer_sums_exact(tile, mode):
    """Raw sums at every H200 tile (M, N off the tile grid, 3 groups): exact, including all-extreme codes."""
    torch.manual_seed(tile[0] + tile[1])
    M, N, K = 70, 150, 192
    codes = torch.randint(-8, 8, (M, K))
    codes[:5] = -8  # |sum| at its maximum: 64 * 8 * 15 before the offset correction
    b = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    b[:3] = 0x77  # all +7
    b[3:6] = 0x88  # all -8
    q, planes = offset_operands(codes, mode)
    y = w4a4_mma8_gemm(q, planes, b, torch.ones(N, K // 64), None, None, None, torch.float32, 64, tile=tuning.Tile(*tile))
    from dq.quant import unpack_4bit

    assert torch.equal(y, (codes.long() @ unpack_4bit(b, True).long().t()).float())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tile", [(16, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("M,N,K,rank", GPU_CASES + [(1, 64, 64, 0)])
def test_w4a4_mma8_linear_gpu_tiles(tile, M, N, K, rank, mode):
    """The 8-bit-MMA W4A4 layer vs the reference at H200 tiles, with and without the low-rank branch."""
    torch.manual_seed(M + N + K + rank + tile[1])
    x, b, sm, ld, lu = linear_inputs(M, N, K, rank)
    qw, sw = make_weight(N, K, QuantSpec("int4", PerGroup(64)), "int4")
    y = w4a4_mma8_linear(x, qw, sw, b, 64, sm, ld, lu, mode=mode, tile=tuning.Tile(*tile))
    ref = quantized_linear_reference(x, qw, sw, None, b, weight_format="int4", in_features=K,
                                     act_spec=QuantSpec("int4", PerToken(64)), smooth=sm, lora_down=ld, lora_up=lu, act_rounding="reciprocal")
    assert y.shape == (M, N) and rel(y, ref) < 4e-3


def test_w4a4_float32_close_on_every_path():
    """fp32 output: both 8-bit-MMA flavours and the unpacking kernel (mma8=False) match the reference to 1e-5."""
    torch.manual_seed(9)
    M, N, K = 19, 40, 256
    x, sm = torch.randn(M, K), torch.rand(K) + 0.5
    qw, sw = make_weight(N, K, QuantSpec("int4", PerGroup(64)), "int4")
    ref = quantized_linear_reference(x, qw, sw, None, None, weight_format="int4", in_features=K,
                                     act_spec=QuantSpec("int4", PerToken(64)), smooth=sm, act_rounding="reciprocal")
    for mma8 in ("fp8", "int8", False):
        y = w4_linear(x, qw, sw, None, 64, 4, sm, mma8=mma8)
        assert rel(y, ref) < 1e-5


def test_mma8_self_check_and_mode_cpu():
    """The device self-check passes in both flavours under the interpreter, and the CPU mode is fp8."""
    cpu = torch.device("cpu")
    assert self_check(cpu, "fp8") and self_check(cpu, "int8")
    assert mma8_mode(cpu) == "fp8"


def test_w4a4_mma8_bad_inputs_raise():
    qw, sw = make_weight(8, 128, QuantSpec("int4", PerGroup(64)), "int4")
    q, planes = offset_operands(torch.randint(-8, 8, (4, 128)), "fp8")
    with pytest.raises(DQError):
        w4a4_mma8_gemm(q, planes[:, :, :4], qw, sw, None, None, None, torch.float32, 64)  # unpadded planes
    with pytest.raises(DQError):
        w4a4_mma8_gemm(q.view(torch.uint8), planes, qw, sw, None, None, None, torch.float32, 64)  # not e4m3/int8
    with pytest.raises(DQError):
        w4a4_mma8_linear(torch.randn(4, 128), qw, sw, None, 64, mode="int4")
