import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CI has no GPU: Triton kernels run in the interpreter, which reads this when a kernel is decorated,
# so it must be set before anything imports dq.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# One CPU thread for the whole suite: tiny models gain nothing from threads, OpenMP barriers dominate
# small ops on shared cores, and a fixed thread count keeps float reductions (and so quantized codes)
# reproducible across the processes a test starts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
