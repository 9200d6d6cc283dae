"""Block-sequential calibration of a full-width FLUX.1-dev transformer: time and peak memory per block.

Builds a FLUX pipeline directory whose transformer is FLUX.1-dev's published config cut to 2 double and 4 single
blocks (full width: 3072 hidden, 24 heads, 4096-wide T5 context), random BF16 weights written without ever
holding the model; the pipeline has no text encoders (calibration runs on random prompt embeddings, 512 T5 tokens)
and a small VAE whose scale factor is FLUX's (8). Then runs `dq.pipelines.sequential.sequential_quantize` with
svdquant-w4a4 in a fresh process and records each stage's time and peak RSS (the kernel's high-water mark, reset
per stage) against the RSS of the idle interpreter that imported dq, and projects the whole model's time:
capture scaled by the blocks' parameter count, each double / single block at the mean measured time.

    python benchmarks/sequential_flux.py                 # 256x256, 2 calibration prompts, 4 steps
    python benchmarks/sequential_flux.py --size 512 --samples 4

Writes benchmarks/results/sequential_flux_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import FLUX_DEV  # noqa: E402  the published config
from stream_quantize import run_python, write_random_checkpoint  # noqa: E402

from dq.metrics.perf import cpu_name  # noqa: E402

CUT = dict(FLUX_DEV, num_layers=2, num_single_layers=4)
FULL_BLOCKS = {"transformer_blocks": FLUX_DEV["num_layers"], "single_transformer_blocks": FLUX_DEV["num_single_layers"]}
QUANTIZE = """
import json, sys, torch
import psutil
import dq
from dq.pipelines.sequential import sequential_quantize
idle = psutil.Process().memory_info().rss  # an idle interpreter that imported dq
pipeline, recipe, out, samples, steps, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
gen = torch.Generator().manual_seed(0)
kwargs = {"prompt_embeds": torch.randn(1, 512, 4096, generator=gen), "pooled_prompt_embeds": torch.randn(1, 768, generator=gen),
          "height": size, "width": size}
calib = dq.CalibConfig(prompts=["p"] * samples, samples=samples, steps=steps, batch_size=samples, pipeline_kwargs=kwargs)
report = sequential_quantize(pipeline, recipe, out, calib=calib)
print(json.dumps({"idle_rss": idle, "stages": report.stages, "layers": report.quantized, "bytes_out": report.bytes_out}))
"""


def write_pipeline(directory: Path) -> int:
    """The FLUX pipeline directory (cut transformer, no text encoders, small VAE); returns the transformer's bytes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tiny = FluxTransformer2DModel(**dict(CUT, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)))
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 transformer=tiny).save_pretrained(directory)
    shutil.rmtree(directory / "transformer")
    (directory / "transformer").mkdir()
    return write_random_checkpoint("FluxTransformer2DModel", CUT, directory / "transformer", 2 * 2**30)


def block_params() -> dict[str, int]:
    """Parameters of one double block, one single block, and the glue of the cut model (meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(**CUT)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks = count(net.transformer_blocks) + count(net.single_transformer_blocks)
    return {"double": count(net.transformer_blocks[0]), "single": count(net.single_transformer_blocks[0]), "glue": count(net) - blocks}


def project(stages: dict, params: dict) -> dict:
    """Whole FLUX.1-dev: capture scaled by block parameters, blocks at the measured mean of their kind."""
    double = [s for name, (s, _) in stages.items() if name.startswith("block transformer_blocks.")]
    single = [s for name, (s, _) in stages.items() if name.startswith("block single_transformer_blocks.")]
    cut_blocks = CUT["num_layers"] * params["double"] + CUT["num_single_layers"] * params["single"]
    full_blocks = FULL_BLOCKS["transformer_blocks"] * params["double"] + FULL_BLOCKS["single_transformer_blocks"] * params["single"]
    capture = stages["capture"][0] * full_blocks / cut_blocks
    blocks = FULL_BLOCKS["transformer_blocks"] * statistics.mean(double) + FULL_BLOCKS["single_transformer_blocks"] * statistics.mean(single)
    other = sum(s for name, (s, _) in stages.items() if not name.startswith("block ") and name != "capture")
    return {"capture_s": capture, "blocks_s": blocks, "other_s": other, "total_s": capture + blocks + other}


def markdown(result: dict) -> str:
    idle = result["idle_rss"]
    lines = [f"# Block-sequential {result['recipe']} calibration, FLUX.1-dev cut to {CUT['num_layers']} double + "
             f"{CUT['num_single_layers']} single blocks ({result['device']}, {result['threads']} threads, {result['date']})", "",
             f"Transformer checkpoint: {result['checkpoint_bytes'] / 2**30:.2f} GiB BF16 (full width); calibration: "
             f"{result['samples']} prompts x {result['steps']} steps at {result['size']}x{result['size']} (512 T5 tokens). "
             f"One double block holds {result['params']['double'] / 1e6:.0f} M parameters, one single block "
             f"{result['params']['single'] / 1e6:.0f} M, the glue {result['params']['glue'] / 1e6:.0f} M. "
             f"Peak: RSS high-water mark of the stage; idle interpreter after `import dq`: {idle / 2**20:.0f} MiB.", "",
             "| stage | time s | peak RSS MiB | above idle MiB |", "|---|---|---|---|"]
    for name, (seconds, peak) in result["stages"].items():
        lines.append(f"| {name} | {seconds:.1f} | {peak / 2**20:.0f} | {(peak - idle) / 2**20:.0f} |")
    p = result["projection"]
    lines += ["", f"Projected for the whole FLUX.1-dev (19 double + 38 single blocks, same calibration set): capture "
              f"{p['capture_s'] / 60:.0f} min, blocks {p['blocks_s'] / 60:.0f} min, total {p['total_s'] / 3600:.1f} h on this machine; "
              "peak memory stays that of one block (the largest stage above).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="svdquant-w4a4")
    ap.add_argument("--samples", type=int, default=2, help="calibration prompts")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of the calibration run")
    ap.add_argument("--size", type=int, default=256, help="image size of the calibration run")
    ap.add_argument("--workdir", default=None, help="where the pipeline and output are written (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sequential_flux_cpu"))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dq-seq-flux-"))
    pipeline, out = work / "flux-cut", work / "flux-cut-q"
    for d in (pipeline, out, out.with_name(out.name + ".dq-partial")):
        shutil.rmtree(d, ignore_errors=True)
    checkpoint_bytes = write_pipeline(pipeline)
    result = json.loads(run_python(QUANTIZE, str(pipeline), args.recipe, str(out), str(args.samples), str(args.steps), str(args.size)))
    params = block_params()
    result.update(device=cpu_name(), threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"), checkpoint_bytes=checkpoint_bytes,
                  samples=args.samples, steps=args.steps, size=args.size, recipe=args.recipe, params=params,
                  projection=project(result["stages"], params))
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
