"""Tile configurations per GPU generation and the autotuner wrapper the GEMM launchers share.

sm80 (A100: 164 KB shared memory), sm89 (Ada: 100 KB, FP8 tensor cores), sm90 (Hopper: 228 KB,
wgmma; no INT4 tensor cores, so 4-bit operands are unpacked to INT8 in registers). Configs are
(BLOCK_M, BLOCK_N, num_warps, num_stages); under TRITON_INTERPRET (CPU) one small tile is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    # Integer GEMMs with the K loop at one group (64) per step: large tiles hide the per-group scaling.
    "w4": {
        80: [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4)],
        89: [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        90: [(128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
             (32, 64, 4, 4), (16, 64, 4, 4)],
    },
    # 8-bit-MMA W4A4 (w4a4_mma8.py), tile computed transposed: BLOCK_N weight rows are the MMA's M
    # (64 per warpgroup), BLOCK_M tokens its N. Accumulator + per-group partial = 2*BM*BN/threads fp32
    # registers. sm90 SASS (benchmarks/results/kernels_h200_sass.md): 128x64 / 4 warps has the fewest
    # instructions per group (255) at 236 registers, two CTAs per SM; 128x128 / 8 warps 275 at 176.
    "w4a4_mma8": {
        80: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        89: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        90: [(128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4)],
    },
    # Progressive-group W4A8 (w4a8_progressive.py), transposed like w4a4_mma8, one INT32 accumulator per output
    # (no per-group partial): the same tiles, untimed on a GPU so far.
    "w4a8_progressive": {
        80: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        89: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        90: [(128, 256, 8, 4), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4)],
    },
    "w8": {
        80: [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4)],
        89: [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)],
        90: [(128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 4),
             (32, 64, 4, 4), (16, 64, 4, 4)],
    },
    # Weight-only: small M is bound by weight bytes, so narrow N tiles to spread them over all SMs.
    "w4a16": {
        80: [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
        89: [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
        90: [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3),
             (128, 128, 8, 3)],
    },
}
_BLOCK_K = {"w4": None, "w4a4_mma8": None, "w4a8_progressive": None, "w8": 128, "w4a16": None}


@dataclass(frozen=True)
class Tile:
    """A launch's tile, given instead of autotuning: (BLOCK_M, BLOCK_N), and BLOCK_K for kernels that tile K.

    On CPU (TRITON_INTERPRET) launches use INTERPRET_TILE unless given one; tests give the GPU configs' tiles
    (gpu_tiles) so every tile the autotuner can pick on a GPU is exercised on CPU too.
    """

    block_m: int
    block_n: int
    block_k: int | None = None


INTERPRET_TILE = Tile(16, 32, 32)


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    return 90 if cc >= 90 else 89 if cc >= 89 else 80


def _fits(cfg: tuple[int, int, int, int], M: int) -> bool:
    # Tiles much taller than M waste the MMA; keep the small ones for small M and vice versa.
    bm = cfg[0]
    return bm <= max(16, triton.next_power_of_2(M)) and (M <= 64 or bm >= 32)


@functools.lru_cache(maxsize=None)
def tuned(kernel, family: str, arch: int):
    """kernel wrapped in triton.autotune over the family's configs for `arch` (key: M bucket, N, K)."""
    configs = []
    for bm, bn, warps, stages in _CONFIGS[family][arch]:
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}
        if _BLOCK_K[family]:
            kw["BLOCK_K"] = _BLOCK_K[family]
        configs.append(triton.Config(kw, num_warps=warps, num_stages=stages))

    def prune(configs, named_args, **kwargs):
        m = named_args["M"]
        kept = [c for c in configs if _fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 0, 0), m)]
        return kept or configs[-1:]

    tuner = triton.autotune(
        configs=configs, key=["M_KEY", "N", "K"], prune_configs_by={"early_config_prune": prune},
        warmup=5, rep=20,
    )(kernel)
    _TUNERS[(kernel.__name__, family, arch)] = tuner
    return tuner


_TUNERS: dict[tuple[str, str, int], object] = {}


def chosen_configs() -> dict[str, dict[str, str]]:
    """The autotuner's pick per kernel and key (M bucket, N, K) so far, as strings (benchmark reports)."""
    return {f"{name}/{family}/sm{arch}": {str(k): str(c) for k, c in getattr(t, "cache", {}).items()}
            for (name, family, arch), t in _TUNERS.items()}


def launch(kernel, family: str, grid_fn, device: torch.device, args: tuple, kwargs: dict, tile: Tile | None = None) -> None:
    """Run `kernel` with `tile`; without one, autotuned on CUDA, or with INTERPRET_TILE on CPU (TRITON_INTERPRET=1)."""
    if tile is None and device.type == "cuda":
        tuned(kernel, family, _arch(device))[grid_fn](*args, **kwargs)
        return
    tile = tile or INTERPRET_TILE
    kw = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "GROUP_M": 8 if device.type == "cuda" else 2}
    if _BLOCK_K[family]:
        kw["BLOCK_K"] = block_k(family, device, tile)
    kernel[grid_fn](*args, **kwargs, **kw)


def gpu_tiles(family: str, arch: int = 90) -> list[tuple[int, int]]:
    """The (BLOCK_M, BLOCK_N) tiles the autotuner may pick for `family` on `arch`."""
    return sorted({(c[0], c[1]) for c in _CONFIGS[family][arch]})


def block_k(family: str, device: torch.device, tile: Tile | None = None) -> int | None:
    """The K tile of `family` on `device` with `tile` (None: the kernel steps K by the quantization group)."""
    if _BLOCK_K[family] is None:
        return None
    if tile is not None and tile.block_k is not None:
        return tile.block_k
    return _BLOCK_K[family] if device.type == "cuda" else INTERPRET_TILE.block_k


def m_key(M: int) -> int:
    """Autotuning bucket for the token count."""
    return min(triton.next_power_of_2(M), 16384)
