"""The domain CLIP: an open_clip ``CLIP`` trained on the reference shapes, for CLIP score and FID."""

from __future__ import annotations

from pathlib import Path

import torch

from dq.errors import DQError

from .tokenization import CLIP_CONTEXT_LENGTH, write_open_clip_bpe

CONFIG_NAME = "dq-shapes-clip"
CONFIG_PATH = Path(__file__).parent / "configs" / f"{CONFIG_NAME}.json"
CLIP_DIR = Path(__file__).parent / "weights" / "domain-clip"
CHECKPOINT = "open_clip_model.safetensors"
BPE_FILE = "bpe_shapes.txt.gz"


def register_config() -> str:
    """Register the domain CLIP config with open_clip; returns its model name."""
    import open_clip

    if CONFIG_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
    return CONFIG_NAME


def clip_checkpoint(directory: Path = CLIP_DIR) -> Path:
    """Path of the trained domain CLIP weights (load with ``pretrained=``)."""
    return Path(directory) / CHECKPOINT


def clip_tokenizer(directory: Path = CLIP_DIR):
    """open_clip ``SimpleTokenizer`` over the caption BPE stored next to the weights."""
    import open_clip

    bpe = Path(directory) / BPE_FILE
    if not bpe.exists():
        write_open_clip_bpe(str(bpe))
    return open_clip.tokenizer.SimpleTokenizer(bpe_path=str(bpe), context_length=CLIP_CONTEXT_LENGTH)


def domain_clip(device: str | torch.device = "cpu", directory: Path = CLIP_DIR):
    """Load the trained domain CLIP: returns ``(model, preprocess, tokenizer)``.

    Example:
        >>> model, preprocess, tokenizer = domain_clip()
        >>> feats = model.encode_image(preprocess(image).unsqueeze(0))
    """
    import open_clip

    checkpoint = clip_checkpoint(directory)
    if not checkpoint.exists():
        raise DQError(f"domain CLIP weights not found at {checkpoint}; run `python -m dq.reference.train_clip`")
    model, _, preprocess = open_clip.create_model_and_transforms(register_config(), pretrained=str(checkpoint))
    return model.to(device).eval(), preprocess, clip_tokenizer(directory)
