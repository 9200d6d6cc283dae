"""Step caches as diffusers ModelHooks: DeepCache (UNet), block caching and First Block Cache (DiT), CacheQuant.

Each method is one config dataclass (with its paper link) plus `apply_<method>`, registered in
CACHE_METHODS; `enable_cache(pipe, name_or_config)` / `disable_cache(pipe)` are the entry points.
"""

from dq.cache.api import (
    CalibrationReplay,
    cache_stats,
    calibration_replay,
    disable_cache,
    enable_cache,
    make_config,
    parse_variant,
    record_trajectory,
    recording,
)
from dq.cache.block_cache import BlockCacheConfig, apply_block_cache
from dq.cache.cachequant import CacheQuantConfig, calibrate_cachequant
from dq.cache.config import CACHE_METHODS, CacheConfig
from dq.cache.deepcache import DeepCacheConfig, apply_deepcache, plan_deepcache
from dq.cache.first_block_cache import FirstBlockCacheConfig, apply_first_block_cache
from dq.cache.schedule import dp_schedule, l1_cost_matrix, quadratic_schedule, schedule_error, uniform_schedule

__all__ = [
    "BlockCacheConfig",
    "CACHE_METHODS",
    "CacheConfig",
    "CacheQuantConfig",
    "CalibrationReplay",
    "DeepCacheConfig",
    "FirstBlockCacheConfig",
    "apply_block_cache",
    "apply_deepcache",
    "apply_first_block_cache",
    "cache_stats",
    "calibrate_cachequant",
    "calibration_replay",
    "disable_cache",
    "dp_schedule",
    "enable_cache",
    "l1_cost_matrix",
    "make_config",
    "parse_variant",
    "plan_deepcache",
    "quadratic_schedule",
    "record_trajectory",
    "recording",
    "schedule_error",
    "uniform_schedule",
]
