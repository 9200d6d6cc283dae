"""Train ``ref-video``: a ``WanPipeline`` (6-block Wan DiT, flow matching) on moving shapes.

    python -m dq.reference.train_vae --video    # once, builds build/reference/vae-video
    python -m dq.reference.train_video [--steps N] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import components, training
from .tokenization import t5_tokenizer

FLOW_SHIFT = 2.0
TEXT_LENGTH = 512  # WanPipeline's default max_sequence_length: it zero-pads prompt embeddings to it


def build_pipeline(vae_dir: Path, seed: int):
    """Untrained ``ref-video``: trained Wan VAE, frozen random UMT5 encoder, fresh transformer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT
    )
    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=components.t5_text_encoder(seed, umt5=True),
        vae=AutoencoderKLWan.from_pretrained(vae_dir),
        transformer=components.wan_transformer(seed),
        scheduler=scheduler,
    )


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor) -> torch.Tensor:
    """Normalized Wan latents (posterior mean), the inverse of the pipeline's decode scaling."""
    z = torch.cat([vae.encode(clips[i : i + 32].to(vae.device)).latent_dist.mean for i in range(0, len(clips), 32)])
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean, std = torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)
    return (z.cpu() - mean) / std


def main(argv: list[str] | None = None) -> None:
    p = training.parser(__doc__, training.WEIGHTS_DIR / "ref-video", steps=5000, batch_size=64, lr=5e-4, samples=3000)
    p.add_argument("--vae", type=Path, default=training.BUILD_DIR / "vae-video", help="trained Wan VAE")
    args = p.parse_args(argv)
    training.setup(args)

    pipe = build_pipeline(args.vae, args.seed)
    captions, clips = training.render_clips(args.samples, args.seed)
    latents = encode_clips(pipe.vae.to(args.device), clips)
    pipe.vae.to("cpu")
    unique, caption_ids = training.caption_index(captions)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(unique, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH)
    model = pipe.transformer
    latents, text, caption_ids = (x.to(args.device) for x in (latents, text, caption_ids))

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        idx = idx.to(args.device)
        x0 = latents[idx]
        noise = training.randn_like(x0, gen)
        u = training.rand(len(idx), gen, x0.device)
        sigma = (FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        cond = text[training.drop_captions(caption_ids[idx], gen)]
        pred = model(noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=cond).sample
        return F.mse_loss(pred, noise - x0)

    seconds = training.fit(model, loss_fn, len(latents), args)
    pipe.to(torch.float16)
    training.atomic_save(args.out, lambda d: pipe.save_pretrained(d), training.run_info(args, seconds))


if __name__ == "__main__":
    main()
