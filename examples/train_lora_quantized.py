"""Teach a quantized model a new word: QLoRA-style LoRA fine-tuning of the W4A4 ref-sd UNet (CPU, minutes).

The reference SD knows six colour words. We invent a seventh, "zaffre", and show it blue shapes captioned
with it. The base is quantized first (SVDQuant W4A4) and stays frozen; only PEFT LoRA adapters on the
UNet's attention projections train, with gradients flowing through the quantized layers (as in QLoRA /
EfficientDM). Learning is measured with the domain CLIP: for images generated from "zaffre" prompts,
which colour caption does CLIP retrieve? Before training the answer is arbitrary; after, it is "blue".
The trained LoRA is saved in diffusers format and loaded back onto a freshly quantized pipeline with
`load_lora_weights`, where it runs inside the SVDQ low-rank branches.

    python examples/train_lora_quantized.py                    # ~200 steps
    python examples/train_lora_quantized.py --steps 60 --recipe w4a4 --out /tmp/zaffre
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dq
from dq import reference
from dq import CalibConfig
from dq.reference import data

NEW_WORD, MEANING = "zaffre", "blue"


def concept_scenes(split: str) -> list[data.Scene]:
    """Scenes with the taught colour; held-out captions are kept for evaluation only."""
    return [s for s in data.split_scenes(split) if s.color == MEANING]


def caption(scene: data.Scene) -> str:
    return scene.caption.replace(MEANING, NEW_WORD)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    emb, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return emb


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    x = torch.from_numpy(data.to_tensor(images)).float()  # [-1, 1], (N, 3, H, W)
    return pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor


@torch.no_grad()
def colour_retrieval(pipe, scenes, clip, steps: int, seed: int = 0) -> dict:
    """Generate from the new-word captions; CLIP picks among the caption with each known colour."""
    model, _, tokenizer = clip
    from dq.metrics.clip_backbone import CLIPImageFeatures
    from dq.metrics.images import to_uint8

    feats = CLIPImageFeatures(model)
    colours = list(data.COLORS)
    hits, picks = 0, []
    for i, scene in enumerate(scenes):
        gen = torch.Generator().manual_seed(seed + i)
        img = pipe(caption(scene), num_inference_steps=steps, generator=gen, output_type="pt", **reference.generation_kwargs("ref-sd")).images
        image_emb = F.normalize(feats(to_uint8(img.clamp(0, 1))), dim=-1)
        candidates = [scene.caption.replace(MEANING, c) for c in colours]
        text_emb = F.normalize(model.encode_text(tokenizer(candidates)), dim=-1)
        pick = colours[int((image_emb @ text_emb.t()).argmax())]
        picks.append(pick)
        hits += pick == MEANING
    return {"accuracy": hits / len(scenes), "chance": 1 / len(colours), "picks": picks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="svdquant-w4a4")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sample-steps", type=int, default=20, help="denoising steps when generating for evaluation")
    ap.add_argument("--eval", type=int, default=12, help="held-out concept captions evaluated")
    ap.add_argument("--out", default="zaffre-lora")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = reference.load("ref-sd")
    t0 = time.perf_counter()
    report = dq.quantize(pipe, args.recipe, calib=CalibConfig(prompts="reference", steps=10, samples=8))
    print(f"{report} in {time.perf_counter() - t0:.0f}s")
    clip = reference.domain_clip()
    eval_scenes = concept_scenes("heldout")[: args.eval] or concept_scenes("train")[: args.eval]
    before = colour_retrieval(pipe, eval_scenes, clip, args.sample_steps)
    print(f"before: CLIP picks '{MEANING}' for {before['accuracy']:.0%} of '{NEW_WORD}' images (chance {before['chance']:.0%})")

    # -- the training set: rendered blue shapes captioned with the new word ---------------------------------
    train = concept_scenes("train")
    rng = np.random.default_rng(0)
    n = max(64, args.batch * 4)
    scenes = [train[i % len(train)] for i in range(n)]
    latents = encode_images(pipe, [data.render_image(s, rng) for s in scenes])
    cond = encode_prompts(pipe, [caption(s) for s in scenes])

    # -- LoRA on the frozen quantized UNet ------------------------------------------------------------------
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, sched = pipe.unet, pipe.scheduler
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    unet.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,))
        x0, c = latents[idx], cond[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,))
        xt = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=c).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f}s)")
    unet.eval()
    train_seconds = time.perf_counter() - t0

    after = colour_retrieval(pipe, eval_scenes, clip, args.sample_steps)
    print(f"after:  CLIP picks '{MEANING}' for {after['accuracy']:.0%} of '{NEW_WORD}' images")

    # -- save in diffusers format, reload onto a fresh quantized pipeline (inference path) ----------------------
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    lora_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=lora_sd)
    fresh = reference.load("ref-sd")
    dq.quantize(fresh, args.recipe, calib=CalibConfig(prompts="reference", steps=10, samples=8))
    fresh.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"), adapter_name=NEW_WORD)
    reloaded = colour_retrieval(fresh, eval_scenes, clip, args.sample_steps)
    print(f"reloaded LoRA on a fresh quantized pipeline: {reloaded['accuracy']:.0%}")
    result = {"recipe": args.recipe, "word": NEW_WORD, "meaning": MEANING, "train_steps": args.steps,
              "train_seconds": round(train_seconds, 1), "before": before, "after": after, "reloaded": reloaded}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
