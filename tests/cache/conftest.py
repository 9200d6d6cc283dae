import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_pipelines import build  # noqa: E402


@pytest.fixture
def sd():
    """Tiny SD pipeline (CFG batched cond/uncond) with 4 steps, progress bar off."""
    pipe, kwargs = build("sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs["num_inference_steps"] = 4
    return pipe, kwargs


@pytest.fixture
def pixart():
    pipe, kwargs = build("pixart")
    pipe.set_progress_bar_config(disable=True)
    kwargs["num_inference_steps"] = 4
    return pipe, kwargs
