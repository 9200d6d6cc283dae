"""Train the domain CLIP contrastively on reference images and video frames.

    python -m dq.reference.train_clip [--steps N] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import clip, training
from .tokenization import write_open_clip_bpe


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[-1, 1] images to the CLIP input normalization (what ``preprocess`` does to a 32x32 PIL image)."""
    x = (images + 1) / 2
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _training_set(args) -> tuple[list[str], torch.Tensor]:
    """Images plus single frames of clips, each with its own caption."""
    captions, images = training.render_images(args.samples, args.seed)
    clip_captions, clips = training.render_clips(args.samples // 8, args.seed)
    frames = clips.permute(0, 2, 1, 3, 4).reshape(-1, *clips.shape[1:2], *clips.shape[3:])
    captions += [c for c in clip_captions for _ in range(clips.shape[2])]
    return captions, torch.cat([images, frames])


def main(argv: list[str] | None = None) -> None:
    p = training.parser(__doc__, clip.CLIP_DIR, steps=3000, batch_size=256, lr=1e-3, samples=16000)
    args = p.parse_args(argv)
    training.setup(args)
    import open_clip

    model = open_clip.create_model(clip.register_config())
    cfg = model.visual.preprocess_cfg
    captions, images = _training_set(args)
    images = normalize(images, cfg["mean"], cfg["std"])
    unique, caption_ids = training.caption_index(captions)
    tokens = clip.clip_tokenizer(training.BUILD_DIR)(unique)

    images, tokens, caption_ids = (x.to(args.device) for x in (images, tokens, caption_ids))

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        idx = idx.to(args.device)
        ids = caption_ids[idx]
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt = F.normalize(model.encode_text(tokens[ids]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # Captions repeat within a batch: every sample with the same caption is a positive.
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    seconds = training.fit(model, loss_fn, len(images), args)

    def write(d) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(d / clip.CHECKPOINT))
        write_open_clip_bpe(str(d / clip.BPE_FILE))

    training.atomic_save(args.out, write, training.run_info(args, seconds, config=clip.CONFIG_NAME))


if __name__ == "__main__":
    main()
