"""Quality, fidelity and performance metrics on torchmetrics, torch-fidelity and open_clip.

``METRICS`` maps the names eval accepts (``--metrics fid,clip,psnr,ssim,lpips``) to metric classes that share
one surface (see ``dq.metrics.base``). ``dq.metrics.perf`` measures speed and memory around a pipeline call.
"""

from dq.metrics.base import METRICS, PerImageMetric
from dq.metrics.clip import HFCLIPScore, OpenCLIPScore, caption_retrieval_accuracy
from dq.metrics.clip_backbone import CLIPImageFeatures, load_open_clip
from dq.metrics.fid import FID, resolve_inception_weights
from dq.metrics.images import Images, to_float, to_uint8
from dq.metrics.perf import PerfResult, StepTimer, TimedCall, measure_pipeline, peak_memory, timed_call, warm_up
from dq.metrics.similarity import LPIPS, PSNR, SSIM

__all__ = [
    "CLIPImageFeatures",
    "FID",
    "HFCLIPScore",
    "Images",
    "LPIPS",
    "METRICS",
    "OpenCLIPScore",
    "PSNR",
    "PerImageMetric",
    "PerfResult",
    "SSIM",
    "StepTimer",
    "TimedCall",
    "caption_retrieval_accuracy",
    "load_open_clip",
    "measure_pipeline",
    "peak_memory",
    "resolve_inception_weights",
    "timed_call",
    "to_float",
    "to_uint8",
    "warm_up",
]
