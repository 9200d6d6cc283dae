"""Find the denoiser of a diffusers pipeline: the one module dq quantizes, caches and adapts."""

from __future__ import annotations

from torch import nn

from dq.errors import DQError

DENOISER_ATTRIBUTES = ("transformer", "unet")


def find_denoiser(pipe_or_model: object) -> nn.Module:
    """The denoiser of a diffusers pipeline (`pipe.transformer` or `pipe.unet`), or the model itself."""
    for attr in DENOISER_ATTRIBUTES:
        module = getattr(pipe_or_model, attr, None)
        if isinstance(module, nn.Module):
            return module
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    raise DQError(
        f"found no denoiser in {type(pipe_or_model).__name__}: expected a diffusers pipeline with a "
        "`transformer` or `unet` component, or a diffusers model. Pass the pipeline that generates images."
    )
