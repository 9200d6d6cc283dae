"""Streaming quantization of full-size checkpoints on a modest machine: peak memory and time of `dq quantize PATH`.

Writes a random-weight BF16 transformer directory from the published config (PixArt-Sigma XL, FLUX.1-dev),
itself streamed, so that FLUX's 24 GB never sit in memory; then runs `dq quantize` on it in a fresh process per
recipe and records that process's peak RSS above an idle interpreter that imported dq, against the checkpoint's
bytes; for PixArt it also checks that the output equals in-memory dq.quantize of the same weights.

    python benchmarks/stream_quantize.py --model pixart --recipes w4a16
    python benchmarks/stream_quantize.py --model flux --recipes w4a16 w8a8

Writes benchmarks/results/stream_quantize_<model>_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import FLUX_DEV, PIXART_SIGMA_XL  # noqa: E402  the published configs

from dq.metrics.perf import cpu_name  # noqa: E402
from dq.pipelines.streaming import ShardWriter  # noqa: E402

CONFIGS = {"pixart": ("PixArtTransformer2DModel", PIXART_SIGMA_XL), "flux": ("FluxTransformer2DModel", FLUX_DEV)}
QUANTIZE = """
import json, sys, threading, time
import psutil
from dq.pipelines.streaming import stream_quantize
process, peak, running = psutil.Process(), [0], [True]
idle = process.memory_info().rss  # an idle interpreter that imported dq

def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.01)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
report = stream_quantize(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
running[0] = False
sampler.join()
print(json.dumps({"seconds": seconds, "stages": report.stages, "bytes_in": report.bytes_in, "bytes_out": report.bytes_out,
                  "layers": report.quantized, "idle_rss": idle, "peak_rss": max(peak[0], process.memory_info().rss)}))
"""


def write_random_checkpoint(class_name: str, config: dict, directory: Path, shard_bytes: int) -> int:
    """A BF16 checkpoint of random weights (std 0.02, norms at 1) of a diffusers model config; returns its bytes."""
    import diffusers

    with torch.device("meta"):
        net = getattr(diffusers, class_name)(**config)
    net.save_config(directory)
    writer = ShardWriter(directory, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for name, t in net.state_dict().items():
        value = torch.ones(t.shape) if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight")) else torch.randn(t.shape, generator=gen) * 0.02
        writer.add({name: value.to(torch.bfloat16)})
    return writer.finish()


def run_python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()[-1]


def equals_in_memory(model: str, checkpoint: Path, out: Path, recipe: str) -> bool:
    import diffusers

    import dq

    cls = getattr(diffusers, CONFIGS[model][0])
    streamed = cls.from_pretrained(out).state_dict()
    in_memory = cls.from_pretrained(checkpoint)
    dq.quantize(in_memory, recipe)
    reference = in_memory.state_dict()
    return set(streamed) == set(reference) and all(torch.equal(streamed[k], reference[k].to(streamed[k].dtype)) for k in reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="pixart")
    ap.add_argument("--recipes", nargs="+", default=["w4a16"])
    ap.add_argument("--shard-gb", type=float, default=5.0, help="shard size of the random input checkpoint")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary directory)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the in-memory equality check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dq-stream-"))
    checkpoint = work / f"{args.model}-bf16"
    start = time.perf_counter()
    shutil.rmtree(checkpoint, ignore_errors=True)
    checkpoint.mkdir(parents=True)
    ckpt_bytes = write_random_checkpoint(*CONFIGS[args.model], checkpoint, int(args.shard_gb * 2**30))
    write_seconds = time.perf_counter() - start
    rows = []
    for recipe in args.recipes:
        out = work / f"{args.model}-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        result = json.loads(run_python(QUANTIZE, str(checkpoint), recipe, str(out)))
        above = result["peak_rss"] - result["idle_rss"]
        row = {"recipe": recipe, "seconds": result["seconds"], "peak_rss": result["peak_rss"], "idle_rss": result["idle_rss"],
               "above_idle": above, "checkpoint_bytes": ckpt_bytes, "bytes_out": result["bytes_out"],
               "ratio_to_checkpoint": above / ckpt_bytes, "layers": result["layers"], "stages": result["stages"]}
        if args.check and args.model == "pixart":
            row["equals_in_memory"] = equals_in_memory(args.model, checkpoint, out, recipe)
        rows.append(row)
        print(json.dumps(row))
        shutil.rmtree(out, ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    cpu = cpu_name()
    result = {"model": args.model, "config": CONFIGS[args.model][0], "cpu": cpu, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "checkpoint_bytes": ckpt_bytes, "write_seconds": write_seconds, "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"stream_quantize_{args.model}_cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Streaming `dq quantize` of a random-weight BF16 {CONFIGS[args.model][0]} ({ckpt_bytes / 2**30:.2f} GiB)",
        "",
        f"{cpu}, {torch.get_num_threads()} threads, {result['date']}. `python benchmarks/stream_quantize.py --model {args.model} "
        f"--recipes {' '.join(args.recipes)}`. Peak RSS of the quantizing process (sampled every 10 ms) above the same "
        f"interpreter idle after importing dq ({rows[0]['idle_rss'] / 2**20:.0f} MiB); the input checkpoint is written first "
        f"({write_seconds:.0f} s).",
        "",
        "| recipe | seconds | peak RSS above idle | x checkpoint bytes | output | equals in-memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seconds']:.0f} | {r['above_idle'] / 2**20:.0f} MiB | {r['ratio_to_checkpoint']:.3f}x | "
                     f"{r['bytes_out'] / 2**30:.2f} GiB | {r.get('equals_in_memory', 'not checked')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
