"""Train the reference image VAE (``AutoencoderKL``) or, with ``--video``, the video VAE (``AutoencoderKLWan``).

    python -m dq.reference.train_vae [--video] [--steps N] [--out DIR]

The VAEs land in ``build/reference/`` (not committed); the pipeline scripts copy them into
each pipeline, where they are committed.
"""

from __future__ import annotations

import sys

import torch

from . import components, training

KL_WEIGHT = 1e-6
TRAIN_FRAMES = 5


def _latent_stats(vae, data: torch.Tensor, video: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    dims = (0, 2, 3, 4) if video else (0, 2, 3)
    return z.mean(dims).cpu(), z.std(dims).cpu()


def main(argv: list[str] | None = None) -> None:
    video = "--video" in (sys.argv[1:] if argv is None else argv)
    out = training.BUILD_DIR / ("vae-video" if video else "vae-image")
    steps, batch_size, samples = (2000, 16, 3000) if video else (2500, 64, 10000)
    p = training.parser(__doc__, out, steps=steps, batch_size=batch_size, lr=1e-3, samples=samples)
    p.add_argument("--video", action="store_true", help="train the Wan video VAE on clips")
    args = p.parse_args(argv)
    training.setup(args)

    vae = components.video_vae(args.seed) if args.video else components.image_vae(args.seed)
    render = training.render_clips if args.video else training.render_images
    _, data = render(args.samples, args.seed)
    data = data.to(args.device)

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = data[idx.to(args.device)]
        if args.video:  # a 5-frame window is as informative per step and half the cost of 9
            start = int(torch.randint(x.shape[2] - TRAIN_FRAMES + 1, (1,), generator=gen))
            x = x[:, :, start : start + TRAIN_FRAMES]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * training.randn_like(posterior.mean, gen)
        recon = vae.decode(z).sample
        return torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + KL_WEIGHT * posterior.kl().mean()

    seconds = training.fit(vae, loss_fn, len(data), args)
    vae.to(args.device)
    data = data[:512]
    mean, std = _latent_stats(vae, data, args.video)
    if args.video:
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    else:
        vae.register_to_config(scaling_factor=float(1.0 / std.mean()), shift_factor=None)
    with torch.no_grad():
        x = data[:256]
        mse = torch.nn.functional.mse_loss(vae(x).sample, x).item()
    print(f"reconstruction mse {mse:.5f}")
    vae.to("cpu")
    info = training.run_info(args, seconds, reconstruction_mse=mse)
    training.atomic_save(args.out, lambda d: vae.save_pretrained(d), info)


if __name__ == "__main__":
    main()
