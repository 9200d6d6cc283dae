"""Why split shortcut quantization matters (or not): the ranges of the two halves of cat([h, skip]).

Q-Diffusion quantizes the UNet decoder convs that read cat([h, skip]) with one quantizer per half
because the two ranges differ up to 200x in its models. This measures, on a reference UNet, max|h| and
max|skip| at every split point dq.calib.qdiffusion finds, over the FP sampling run of held-out prompts.

    python benchmarks/split_ranges.py [--model ref-sd --prompts 8 --steps 10]
Writes benchmarks/results/split_ranges_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dq import reference
from dq.calib.qdiffusion import find_split_points

RESULTS = Path(__file__).parent / "results"


def split_ranges(model: str, prompts: int, steps: int) -> dict[str, dict[str, float]]:
    """layer -> {h_max, skip_max, ratio} over the FP run (ratio = larger / smaller half's max |x|)."""
    pipe = reference.load(model)
    unet = pipe.unet
    ranges: dict[str, list[float]] = {}

    def hook(name: str, split: int):
        def record(module, args):
            x = args[0]
            seen = ranges.setdefault(name, [0.0, 0.0])
            seen[0] = max(seen[0], float(x[:, :split].abs().amax()))
            seen[1] = max(seen[1], float(x[:, split:].abs().amax()))
        return record

    handles = [unet.get_submodule(name).register_forward_pre_hook(hook(name, split))
               for name, split in find_split_points(unet).items()]
    with torch.no_grad():
        pipe(reference.prompts("heldout", n=prompts), num_inference_steps=steps, **reference.generation_kwargs(model))
    for h in handles:
        h.remove()
    return {n: {"h_max": h, "skip_max": s, "ratio": max(h, s) / max(min(h, s), 1e-12)} for n, (h, s) in ranges.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ref-sd")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    rows = split_ranges(args.model, args.prompts, args.steps)
    lines = [f"# Split-shortcut ranges on {args.model} ({args.prompts} prompts x {args.steps} steps)", "",
             "| layer (reads cat([h, skip])) | max abs h | max abs skip | ratio |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['h_max']:.2f} | {r['skip_max']:.2f} | {r['ratio']:.1f}x |" for n, r in rows.items()]
    stem = RESULTS / f"split_ranges_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "layers": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
