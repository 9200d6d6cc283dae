"""Train ``ref-pixart``: a ``PixArtSigmaPipeline`` (6-block PixArt DiT) on the reference shapes.

    python -m dq.reference.train_vae            # once, builds build/reference/vae-image
    python -m dq.reference.train_pixart [--steps N] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import components, training
from .tokenization import T5_MAX_LENGTH, t5_tokenizer


def build_pipeline(vae_dir: Path, seed: int):
    """Untrained ``ref-pixart``: trained VAE, frozen random T5 encoder, fresh transformer."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=components.t5_text_encoder(seed),
        vae=AutoencoderKL.from_pretrained(vae_dir),
        transformer=components.pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
    )


def main(argv: list[str] | None = None) -> None:
    p = training.parser(__doc__, training.WEIGHTS_DIR / "ref-pixart", steps=7000, batch_size=128, lr=5e-4, samples=30000)
    p.add_argument("--vae", type=Path, default=training.BUILD_DIR / "vae-image", help="trained image VAE")
    args = p.parse_args(argv)
    training.setup(args)
    from diffusers import DDPMScheduler

    pipe = build_pipeline(args.vae, args.seed)
    latents, unique, caption_ids = training.image_training_set(pipe.vae, args)
    with torch.no_grad():
        # T5 attention is masked, so embeddings at length 16 equal those at the pipeline's 300.
        text, mask, _, _ = pipe.encode_prompt(unique, False, device="cpu", max_sequence_length=T5_MAX_LENGTH)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    model = pipe.transformer
    latents, text, mask, caption_ids = (x.to(args.device) for x in (latents, text, mask, caption_ids))
    no_extra = {"resolution": None, "aspect_ratio": None}

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        idx = idx.to(args.device)
        x0 = latents[idx]
        noise = training.randn_like(x0, gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(x0.device)
        ids = training.drop_captions(caption_ids[idx], gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = model(noisy, text[ids], encoder_attention_mask=mask[ids], timestep=t, added_cond_kwargs=no_extra).sample
        return F.mse_loss(pred, noise)

    seconds = training.fit(model, loss_fn, len(latents), args)
    pipe.to(torch.float16)
    training.atomic_save(args.out, lambda d: pipe.save_pretrained(d), training.run_info(args, seconds))


if __name__ == "__main__":
    main()
