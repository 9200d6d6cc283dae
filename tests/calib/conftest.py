"""Shared fixtures of the calibration tests: one tiny SD pipeline run, collected once per session."""

import pytest
import torch

from calib_fixtures import tiny_sd_calib


@pytest.fixture(scope="session")
def sd_all_data():
    """Tiny SD pipeline, its config and the data of every step (2 prompts x 4 steps, CFG)."""
    from dq.pipelines.calibration import collect

    pipe, cfg = tiny_sd_calib(sampling="all")
    torch.manual_seed(0)
    return pipe, cfg, collect(pipe, cfg)
