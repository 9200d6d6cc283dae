"""Text-image agreement: CLIP score with open_clip or transformers CLIP, and caption-retrieval accuracy.

CLIP score is ``100 * cos(image embedding, caption embedding)``; the reported value is the mean clipped at 0,
as torchmetrics' ``CLIPScore`` does. Captions are truncated at the model's context length (77 for CLIP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from dq.errors import DQError
from dq.metrics.base import METRICS, PerImageMetric
from dq.metrics.clip_backbone import CLIPImageFeatures, OpenCLIPSpec, load_open_clip
from dq.metrics.images import Images, to_uint8

Tokenizer = Callable[..., torch.Tensor]


@METRICS.register("clip")
class OpenCLIPScore(PerImageMetric):
    """CLIP score of each image against its prompt with an open_clip model.

    Per-image scores are ``100 * cos``; the value is ``max(mean, 0)`` like torchmetrics' ``CLIPScore``.

    Args:
        model: A loaded open_clip model (such as the domain CLIP of dq's reference pipelines), a model name,
            or a ``(name, pretrained)`` pair; see ``load_open_clip``.
        pretrained: With a model name: a pretrained tag or a local checkpoint file.
        tokenizer: The model's tokenizer; required with a model object, looked up by name otherwise.
        antialias: Antialias when resizing images to the model's input size.

    Example:
        >>> metric = OpenCLIPScore("ViT-B-32", pretrained="/models/open_clip_vit_b32.bin")
        >>> metric.update(images, prompts=prompts)
        >>> metric.compute()["value"]
    """

    name = "clip"
    needs = ("prompts",)
    higher_is_better = True

    def __init__(
        self,
        model: OpenCLIPSpec,
        pretrained: Optional[str | os.PathLike] = None,
        tokenizer: Optional[Tokenizer] = None,
        antialias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        clip_model, found_tokenizer, self.backbone = load_open_clip(model, pretrained)
        self.tokenizer = tokenizer or found_tokenizer
        if self.tokenizer is None:
            raise DQError("OpenCLIPScore got a model object without its tokenizer; pass tokenizer=.")
        self.image_features = CLIPImageFeatures(clip_model, antialias=antialias)

    def _scores(
        self, images: Images, reference: Optional[Images], prompts: Optional[Sequence[str]]
    ) -> torch.Tensor:
        pixels = to_uint8(images).to(self.device)
        if prompts is None or len(prompts) != len(pixels):
            got = "None" if prompts is None else f"{len(prompts)} prompts"
            raise DQError(f"clip score needs one prompt per image; got {got} for {len(pixels)} images.")
        image_emb = nn.functional.normalize(self.image_features(pixels), dim=-1)
        text_emb = _encode_text(self.image_features.model, self.tokenizer, list(prompts), self.device)
        return 100 * (image_emb * text_emb).sum(-1)

    def _reduce(self, scores: torch.Tensor) -> float:
        return max(scores.mean().item(), 0.0)

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "backbone": self.backbone, **self.image_features.settings()}


@METRICS.register("clip-hf")
class HFCLIPScore(nn.Module):
    """torchmetrics ``CLIPScore`` for a transformers CLIP checkpoint (a hub id or a local directory).

    The checkpoint loads through torchmetrics' zero-argument callable route with ``CLIPModel`` and
    ``CLIPProcessor``, so a local directory needs no download. torchmetrics keeps only the running sum, so there
    are no per-image scores; the states sum across ranks.

    Args:
        model_name_or_path: A hub id (e.g. ``"openai/clip-vit-large-patch14"``) or a local directory holding a
            ``CLIPModel`` and its ``CLIPProcessor`` (``save_pretrained`` output).

    Example:
        >>> metric = HFCLIPScore("/models/clip-vit-large-patch14")
        >>> metric.update(images, prompts=prompts)
        >>> metric.compute()  # {"value": 31.2}
    """

    name = "clip-hf"
    needs = ("prompts",)

    def __init__(self, model_name_or_path: str | os.PathLike = "openai/clip-vit-large-patch14") -> None:
        super().__init__()
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.source = str(model_name_or_path)
        self.metric = CLIPScore(model_name_or_path=_clip_loader(self.source))

    def update(
        self,
        images: Images,
        reference: Optional[Images] = None,
        prompts: Optional[Sequence[str]] = None,
        ids: Optional[Sequence[int]] = None,
    ) -> None:
        """Score one batch of images against their prompts (``reference`` and ``ids`` are unused)."""
        pixels = to_uint8(images)
        if prompts is None or len(prompts) != len(pixels):
            got = "None" if prompts is None else f"{len(prompts)} prompts"
            raise DQError(f"clip score needs one prompt per image; got {got} for {len(pixels)} images.")
        self.metric.update(list(pixels.to(self.metric.device)), list(prompts))

    def compute(self) -> dict[str, Any]:
        """Return ``{"value": float}``."""
        return {"value": self.metric.compute().item()}

    def reset(self) -> None:
        """Clear the running sum."""
        self.metric.reset()

    def settings(self) -> dict[str, Any]:
        """Return the checkpoint used."""
        return {"metric": self.name, "backbone": f"transformers:{self.source}"}


@torch.no_grad()
def caption_retrieval_accuracy(
    model: nn.Module,
    tokenizer: Tokenizer,
    images: Images,
    captions: Sequence[str],
    candidates: Optional[Sequence[str]] = None,
) -> float:
    """Fraction of images whose own caption ranks first among the candidate captions by CLIP similarity.

    Useful where captions fully describe the image, as in dq's reference domain: a quantized pipeline that
    keeps the content right keeps this close to the FP pipeline's accuracy.

    Args:
        model: An open_clip model.
        tokenizer: Its tokenizer.
        images: One image per caption.
        captions: The true caption of each image.
        candidates: Captions to rank; defaults to the distinct ``captions``. Must contain every true caption.

    Example:
        >>> model, _, tokenizer = dq.reference.domain_clip()
        >>> caption_retrieval_accuracy(model, tokenizer, images, prompts)
        0.94
    """
    candidates = list(dict.fromkeys(candidates if candidates is not None else captions))
    missing = sorted(set(captions) - set(candidates))
    if missing:
        raise DQError(f"caption retrieval: true captions {missing[:3]} are not among the candidates.")
    features = CLIPImageFeatures(model)
    device = next(model.parameters()).device
    pixels = to_uint8(images).to(device)
    if len(pixels) != len(captions):
        raise DQError(f"caption retrieval needs one caption per image; got {len(captions)} for {len(pixels)} images.")
    image_emb = nn.functional.normalize(features(pixels), dim=-1)
    text_emb = _encode_text(model, tokenizer, candidates, device)
    best = (image_emb @ text_emb.T).argmax(dim=-1)
    truth = torch.tensor([candidates.index(caption) for caption in captions], device=device)
    return (best == truth).float().mean().item()


@torch.no_grad()
def _encode_text(model: nn.Module, tokenizer: Tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    """L2-normalised open_clip text embeddings ``(N, d)``."""
    return nn.functional.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)


def _clip_loader(source: str) -> Callable[[], tuple[nn.Module, Any]]:
    """torchmetrics' zero-argument route: load ``CLIPModel`` and ``CLIPProcessor`` from a hub id or directory."""

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        path = Path(source).expanduser()
        location = path if path.is_dir() else source
        return _ProjectedFeatures(CLIPModel.from_pretrained(location)), CLIPProcessor.from_pretrained(location)

    return load


class _ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return tensors, as torchmetrics 1.9 expects.

    transformers 5 returns a ``BaseModelOutputWithPooling`` holding the projected embeddings in ``pooler_output``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _pooled(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _pooled(self.model.get_text_features(*args, **kwargs))


def _pooled(output: Any) -> torch.Tensor:
    """The embedding tensor, from a tensor or a transformers output with ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
