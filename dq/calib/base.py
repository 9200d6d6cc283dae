"""Calibration methods as typed objects: one config dataclass and one Calibrator per method.

A recipe names its method (`method: svdquant`) and gives its settings as `options`. The method's config
class reads those options (`load_config`: unknown fields and values outside a closed set are DQErrors that
list what is allowed), and says what data the method needs (`sampling`, `needs_data`). The Calibrator
registered for that config type (torchao's `quantize_` dispatch on `type(config)`) first plans which layers
are swapped in and how (`plan`), then sets their quantizers from the data (`calibrate`).

Adding a method is one file:

    @dataclass(frozen=True)
    class MyConfig(CalibratorConfig):
        method: ClassVar[str] = "mine"
        sampling: ClassVar[Sampling | None] = Sampling.UNIFORM
        iters: int = 100

    @register_calibrator(MyConfig)
    class MyCalibrator(Calibrator[MyConfig]):
        def calibrate(self, denoiser, layers, recipe, data): ...

and one import line in `dq/calib/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from torch import nn

from dq.errors import DQError
from dq.nn.base import QuantLayerMixin
from dq.nn.select import LayerSelection
from dq.registry import Registry

if TYPE_CHECKING:
    from dq.calib.data import CalibData, CalibSample
    from dq.recipes import Recipe


class Sampling(str, Enum):
    """Which denoising steps calibration samples are taken from."""

    ALL = "all"
    """Every executed step (TFMQ-DM)."""
    UNIFORM = "uniform"
    """Every k-th step, `calib_steps` of them (Q-Diffusion)."""
    NDTC = "ndtc"
    """One step per prompt drawn from a normal distribution over timesteps (PTQ4DM)."""


@dataclasses.dataclass(frozen=True)
class CalibratorConfig:
    """Base of every method's settings. Subclasses are frozen dataclasses whose fields all have defaults.

    method: the name recipes use. sampling: the timestep sampling of the method's data (None: data-free).
    """

    method: ClassVar[str]
    sampling: ClassVar[Sampling | None] = None

    @property
    def needs_data(self) -> bool:
        """Whether the method calibrates on samples of the denoiser's inputs."""
        return self.sampling is not None

    def validate(self) -> None:
        """Raise DQError for settings out of range (the loader has already checked names and types)."""


C = TypeVar("C", bound=CalibratorConfig)


class Calibrator(ABC, Generic[C]):
    """Sets the quantizers of swapped (simulate-mode) layers from calibration data, before deployment."""

    streams: ClassVar[tuple[str, ...]] = ()
    """The block-input streams (dq.calib.data) the method replays besides the quantized model's: block-sequential
    calibration carries each block's inputs in those quantization states of the whole model, so every block is
    calibrated on what the whole model gives it in memory. BRECQ-style reconstruction (Q-Diffusion, TFMQ) takes
    FLOAT (its targets) and WEIGHTS (its weight-phase inputs); range observers take WEIGHTS; SVDQuant FLOAT."""

    def __init__(self, config: C) -> None:
        self.config = config

    def plan(self, denoiser: nn.Module, selection: LayerSelection, recipe: Recipe) -> None:
        """Edit the layer plans before anything is swapped (layer kinds, extra layers); default: none."""

    @abstractmethod
    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        """Set the quantizers of `layers` (name -> swapped layer); `data` is None for data-free methods."""

    # -- block-sequential calibration (dq.pipelines.sequential) ---------------------------------------------
    def prelude_layers(self, denoiser: nn.Module, selection: LayerSelection) -> list[str]:
        """The layers this method computes with on the whole denoiser before any block, from the timesteps
        alone (TFMQ's temporal block, which spans the blocks): the planned ones it calibrates there, the others
        it reads in float. Default: none."""
        return []

    def calibrate_prelude(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], data: CalibData) -> None:
        """Set the planned prelude layers' quantizers (`layers`, swapped); the denoiser's layers outside the
        prelude may be unmaterialized (meta)."""
        raise DQError(f"{type(self).__name__} has no prelude layers to calibrate (its prelude_layers is empty).")

    def replay_groups(self, data: CalibData) -> list[list[CalibSample]]:
        """The samples the method replays together in one denoiser call on its streams. Block-sequential
        calibration computes every block's inputs and outputs in these groups, so a block's inputs are, bit for
        bit, the ones the whole model gives it in memory (a GEMM's last bits depend on its row count, and
        discrete choices such as SVDQuant's smoothing search amplify them). Default: one sample per call."""
        return data.groups(1)

    def block_calibrator(self) -> Calibrator:
        """The calibrator of one block, or of the glue, once the prelude is calibrated; default: this one."""
        return self


METHODS: Registry[type[CalibratorConfig]] = Registry("calibration method")
_CALIBRATORS: dict[type[CalibratorConfig], type[Calibrator]] = {}


def register_calibrator(config_type: type[C]) -> typing.Callable[[type[Calibrator[C]]], type[Calibrator[C]]]:
    """Class decorator: `cls` calibrates recipes whose method is `config_type.method`."""

    def decorator(cls: type[Calibrator[C]]) -> type[Calibrator[C]]:
        METHODS.add(config_type.method, config_type)
        _CALIBRATORS[config_type] = cls
        return cls

    return decorator


def calibrator_for(config: CalibratorConfig) -> Calibrator:
    """The Calibrator registered for `type(config)`, built with that config."""
    try:
        return _CALIBRATORS[type(config)](config)
    except KeyError:
        raise DQError(
            f"no calibrator is registered for {type(config).__name__}; registered configs: "
            f"{', '.join(sorted(t.__name__ for t in _CALIBRATORS))}."
        ) from None


def load_config(method: str, options: dict[str, Any], origin: str = "recipe") -> CalibratorConfig:
    """The typed config of `method` from a recipe's `options`; unknown fields and bad values are DQErrors."""
    config_type = METHODS.get(method)
    hints = typing.get_type_hints(config_type)
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    where = f"{origin}: method {method!r}"
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise DQError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(fields) or 'none'}.")
    values = {name: _coerce(where, name, value, hints[name]) for name, value in options.items()}
    config = config_type(**values)
    try:
        config.validate()
    except DQError as e:
        raise DQError(f"{where}: {e}") from None
    return config


def _coerce(where: str, name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type: enums from their values, ints accepted as floats; else a DQError."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for typ in options:
        if isinstance(typ, type) and issubclass(typ, Enum):
            allowed = [m.value for m in typ]
            if value in allowed:
                return typ(value)
            raise DQError(f"{where}: option {name}={value!r}; allowed: {allowed}.")
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is str and isinstance(value, str):
            return value
    expected = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
    raise DQError(f"{where}: option {name} must be {expected}, got {type(value).__name__} ({value!r}).")
