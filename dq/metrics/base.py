"""The metric registry and the per-image metric base class that ``dq eval`` drives.

Every registered metric is a class with the same surface:

- ``needs``: which inputs it reads besides the evaluated images, a subset of ``("reference", "prompts")``;
- ``update(images, reference=None, prompts=None, ids=None)``: add one batch; ``reference`` holds the FP images
  generated with the same prompts and seeds, ``prompts`` the captions, ``ids`` the prompt indices;
- ``compute() -> dict``: JSON-ready result, ``{"value": float | None, ...}`` plus ``"reason"`` when ``value`` is None;
- ``settings() -> dict``: what eval records in ``results.json`` to make the number reproducible.

Construct metrics before generating images: a missing local weights file raises then, not after the run.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Optional, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dq.metrics.images import Images
from dq.registry import Registry

METRICS: Registry[type] = Registry("metric")


class PerImageMetric(Metric):
    """One score per evaluated image; the value is their mean.

    States are lists that torchmetrics concatenates across processes in ``compute()``, so under
    ``accelerate launch`` each rank updates with its shard and every rank computes over all images.
    Pass ``ids`` (the prompt index of each image) to keep per-image scores aligned across ranks; without
    them images are numbered in update order on each rank.

    Subclasses implement ``_scores`` and set ``name`` and ``needs``.
    """

    full_state_update = False
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.unavailable: Optional[str] = None
        self._next_id = 0

    @abstractmethod
    def _scores(
        self, images: Images, reference: Optional[Images], prompts: Optional[Sequence[str]]
    ) -> torch.Tensor:
        """Return a float tensor ``(N,)`` with one score per image."""

    def update(
        self,
        images: Images,
        reference: Optional[Images] = None,
        prompts: Optional[Sequence[str]] = None,
        ids: Optional[Sequence[int]] = None,
    ) -> None:
        """Score one batch.

        Args:
            images: The evaluated (e.g. quantized) images.
            reference: The FP images for the same prompts and seeds, when ``"reference"`` is in ``needs``.
            prompts: One caption per image, when ``"prompts"`` is in ``needs``.
            ids: One integer per image (the prompt index); defaults to a running count.
        """
        if self.unavailable is not None:
            return
        scores = self._scores(images, reference, prompts).detach().reshape(-1).double()
        if ids is None:
            ids = range(self._next_id, self._next_id + len(scores))
        self._next_id += len(scores)
        self.scores.append(scores.to(self.device))
        self.ids.append(torch.as_tensor(list(ids), dtype=torch.long, device=self.device))

    def compute(self) -> dict[str, Any]:
        """Return ``{"value", "per_image", "ids"}`` ordered by id, or ``{"value": None, "reason"}``."""
        if self.unavailable is not None:
            return {"value": None, "reason": self.unavailable}
        if isinstance(self.scores, list) and not self.scores:
            return {"value": None, "reason": "no images were scored"}
        scores, ids = dim_zero_cat(self.scores), dim_zero_cat(self.ids)
        order = torch.argsort(ids)
        return {
            "value": self._reduce(scores),
            "per_image": scores[order].tolist(),
            "ids": ids[order].tolist(),
        }

    def _reduce(self, scores: torch.Tensor) -> float:
        """Aggregate per-image scores into the reported value."""
        return scores.mean().item()

    def reset(self) -> None:
        """Clear the scores and restart the running image count."""
        super().reset()
        self._next_id = 0

    def settings(self) -> dict[str, Any]:
        """Return the settings eval records next to the value."""
        return {"metric": self.name}
