"""Shared pieces of the reference training scripts: CLI, data tensors, the loop, atomic saving."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dq.io import atomic_directory

from .data import ShapesDataset, ShapesVideoDataset, to_tensor

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILD_DIR = Path("build") / "reference"
CFG_DROP = 0.1


def parser(description: str, out: Path, steps: int, batch_size: int, lr: float, samples: int) -> argparse.ArgumentParser:
    """The flags every training script shares, with that script's defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=out, help="output directory (written atomically)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="samples per step")
    p.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    p.add_argument("--samples", type=int, default=samples, help="distinct training samples rendered")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and noise")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def setup(args: argparse.Namespace) -> None:
    """Seed and thread settings; refuse to clobber an existing output."""
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def render_images(n: int, seed: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``n`` training captions and images as a (n, 3, 32, 32) tensor in [-1, 1]."""
    ds = ShapesDataset(split, seed)
    captions, images = zip(*(ds[i] for i in range(n)))
    return list(captions), torch.from_numpy(to_tensor(list(images)))


def render_clips(n: int, seed: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``n`` training captions and clips as a (n, 3, F, 32, 32) tensor in [-1, 1]."""
    ds = ShapesVideoDataset(split, seed)
    captions, clips = [], []
    for i in range(n):
        caption, frames = ds[i]
        captions.append(caption)
        clips.append(to_tensor(frames).transpose(1, 0, 2, 3))
    return captions, torch.from_numpy(np.stack(clips))


@torch.no_grad()
def image_training_set(vae, args: argparse.Namespace) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Render ``args.samples`` training images; return their scaled VAE latents (posterior mean, computed
    and left on ``args.device``), the unique captions, and each sample's caption index."""
    captions, images = render_images(args.samples, args.seed)
    vae.to(args.device)
    z = torch.cat([vae.encode(images[i : i + 256].to(args.device)).latent_dist.mean for i in range(0, len(images), 256)])
    vae.to("cpu")
    unique, caption_ids = caption_index(captions)
    return z * vae.config.scaling_factor, unique, caption_ids


def caption_index(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """Unique captions with ``""`` first (the unconditional prompt) and each sample's index into them."""
    unique = [""] + sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([lookup[c] for c in captions])


def drop_captions(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replace ~10% of caption ids with 0 (the empty prompt) for classifier-free guidance."""
    keep = torch.rand(ids.shape, generator=generator) >= CFG_DROP
    return ids * keep.to(ids.device)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise drawn from the CPU ``generator`` (same stream on every device), placed on ``x``'s device."""
    return torch.randn(x.shape, generator=generator).to(x.device)


def rand(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform [0, 1) draws from the CPU ``generator``, placed on ``device``."""
    return torch.rand(n, generator=generator).to(device)


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    num_samples: int,
    args: argparse.Namespace,
    log_every: int = 100,
) -> float:
    """AdamW with warmup + cosine decay; ``loss_fn(batch_indices, generator)`` returns the loss.

    Returns the wall time in seconds.
    """
    model.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, min(200, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, running = time.time(), 0.0
    for step in range(args.steps):
        idx = torch.randint(num_samples, (args.batch_size,), generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            n = (step % log_every) + 1
            print(f"step {step + 1}/{args.steps} loss {running / n:.4f} {time.time() - start:.0f}s", flush=True)
            running = 0.0
    model.eval().to("cpu")
    return time.time() - start


def atomic_save(out: Path, write: Callable[[Path], None], info: dict) -> None:
    """Build into a temp dir beside ``out``, add ``training.json`` with ``info``, then rename.

    An existing ``out`` is replaced: ``setup`` already refused it unless ``--overwrite`` was given.
    """
    with atomic_directory(out, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the bundled weights are read by everyone
        write(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out}")


def run_info(args: argparse.Namespace, seconds: float, **extra) -> dict:
    """Training record written next to the weights."""
    keys = ("steps", "batch_size", "lr", "samples", "seed", "threads", "device")
    return {**{k: getattr(args, k) for k in keys}, "train_seconds": round(seconds, 1), **extra}
