"""Train ``ref-sd``: an SD1.5-shaped ``StableDiffusionPipeline`` on the reference shapes.

    python -m dq.reference.train_vae            # once, builds build/reference/vae-image
    python -m dq.reference.train_sd [--steps N] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import components, training
from .tokenization import clip_tokenizer


def build_pipeline(vae_dir: Path, seed: int):
    """Untrained ``ref-sd``: trained VAE, frozen random text encoder, fresh UNet."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=components.clip_text_encoder(seed),
        tokenizer=clip_tokenizer(),
        unet=components.sd_unet(seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> None:
    p = training.parser(__doc__, training.WEIGHTS_DIR / "ref-sd", steps=7000, batch_size=128, lr=1e-3, samples=30000)
    p.add_argument("--vae", type=Path, default=training.BUILD_DIR / "vae-image", help="trained image VAE")
    args = p.parse_args(argv)
    training.setup(args)
    from diffusers import DDPMScheduler

    pipe = build_pipeline(args.vae, args.seed)
    latents, unique, caption_ids = training.image_training_set(pipe.vae, args)
    with torch.no_grad():
        text = pipe.encode_prompt(unique, "cpu", 1, False)[0]
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    latents, text, caption_ids = (x.to(args.device) for x in (latents, text, caption_ids))

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        idx = idx.to(args.device)
        x0 = latents[idx]
        noise = training.randn_like(x0, gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(x0.device)
        cond = text[training.drop_captions(caption_ids[idx], gen)]
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        return F.mse_loss(pred, noise)

    seconds = training.fit(unet, loss_fn, len(latents), args)
    pipe.to(torch.float16)
    training.atomic_save(args.out, lambda d: pipe.save_pretrained(d), training.run_info(args, seconds))


if __name__ == "__main__":
    main()
