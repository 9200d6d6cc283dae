"""Prompt following of the bundled reference pipelines, judged by the domain CLIP.

For each held-out prompt the domain CLIP picks, among the true caption and 9 other held-out
captions, the one closest to the generated image (every frame, for video). The same figure on the
dataset's real images is the ceiling. Also times one 20-step batch-1 generation per pipeline.

    python benchmarks/reference_quality.py [--n 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dq import reference

RESULTS = Path(__file__).parent / "results" / "reference_quality.json"
NUM_CANDIDATES = 10


def candidate_sets(captions: list[str], pool: list[str], seed: int = 0) -> list[list[str]]:
    """For each caption: itself first, then 9 other distinct captions of ``pool``."""
    rng = np.random.default_rng(seed)
    sets = []
    for caption in captions:
        others = [c for c in pool if c != caption]
        picks = rng.choice(len(others), NUM_CANDIDATES - 1, replace=False)
        sets.append([caption] + [others[i] for i in picks])
    return sets


@torch.no_grad()
def retrieval_accuracy(images: list, candidates: list[list[str]], clip) -> float:
    """Fraction of images (a clip counts each frame) whose best caption is the first candidate."""
    model, preprocess, tokenizer = clip
    hits, total = 0, 0
    for sample, cands in zip(images, candidates):
        frames = sample if isinstance(sample, list) else [sample]
        img = model.encode_image(torch.stack([preprocess(f.convert("RGB")) for f in frames]))
        txt = model.encode_text(tokenizer(cands))
        sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        hits += int((sims.argmax(-1) == 0).sum())
        total += len(frames)
    return hits / total


def _outputs(result, video: bool) -> list:
    return [list(clip) for clip in result.frames] if video else result.images


def generate(pipe, name: str, captions: list[str], steps: int, batch: int = 20) -> list:
    """Generate one image or clip per caption, seed = caption index."""
    video, kwargs = reference.is_video(name), reference.generation_kwargs(name)
    out = []
    for i in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(j) for j in range(i, min(i + batch, len(captions)))]
        result = pipe(captions[i : i + batch], num_inference_steps=steps, generator=gens, output_type="pil", **kwargs)
        out += _outputs(result, video)
    return out


def latency(pipe, name: str, caption: str, steps: int, repeats: int = 3) -> float:
    """Median seconds of one batch-1 generation with ``steps`` steps (after one warm-up)."""
    kwargs = reference.generation_kwargs(name)
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        pipe(caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(r), **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="held-out prompts per pipeline")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--names", nargs="*", default=reference.names(), help="pipelines to evaluate")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clip = reference.domain_clip()
    results = {"n": args.n, "steps": args.steps, "candidates": NUM_CANDIDATES, "threads": args.threads, "pipelines": {}}
    for video in (False, True):
        captions = reference.prompts("heldout", args.n, video=video)
        cands = candidate_sets(captions, reference.prompts("heldout", video=video))
        key = "real_video_frames" if video else "real_images"
        results[key] = retrieval_accuracy(reference.real_samples(captions), cands, clip)
    for name in args.names:
        video = reference.is_video(name)
        captions = reference.prompts("heldout", args.n, video=video)
        cands = candidate_sets(captions, reference.prompts("heldout", video=video))
        pipe = reference.load(name)
        start = time.perf_counter()
        acc = retrieval_accuracy(generate(pipe, name, captions, args.steps), cands, clip)
        results["pipelines"][name] = {
            "retrieval_accuracy": acc,
            "ceiling": results["real_video_frames" if video else "real_images"],
            "latency_s_batch1": latency(pipe, name, captions[0], args.steps),
            "eval_seconds": time.perf_counter() - start,
        }
        print(name, results["pipelines"][name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"domain CLIP on real data: images {results['real_images']:.3f}, video frames {results['real_video_frames']:.3f}")
    print(f"{'pipeline':<12} {'retrieval@10':>12} {'ceiling':>8} {'20-step s':>10}")
    for name, r in results["pipelines"].items():
        print(f"{name:<12} {r['retrieval_accuracy']:>12.3f} {r['ceiling']:>8.3f} {r['latency_s_batch1']:>10.2f}")


if __name__ == "__main__":
    main()
