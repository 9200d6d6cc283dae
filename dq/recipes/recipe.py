"""Recipe: a dataclass, loaded from a named YAML in dq/recipes/ or from a path. Data, never code paths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dq.calib.base import CalibratorConfig, load_config
from dq.errors import DQError
from dq.quant import QuantSpec, spec_from_dict, spec_to_dict

RECIPE_DIR = Path(__file__).parent
LAYER_KINDS = ("linear", "conv2d")


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how.

    Args:
        name: the recipe's name (its YAML file stem for bundled recipes).
        description: one line shown by `dq recipes`.
        weight: weight quantizer spec (format, granularity, group_size, symmetric).
        act: input-activation quantizer spec, or None for weight-only.
        method: the calibration method that sets scales / rounding (`dq.calib.METHODS`; "rtn" needs no data).
        layers: which float layer kinds are quantized ("linear", "conv2d").
        skip: glob patterns of module names kept in high precision, added to the family defaults.
        only: when set, only module names matching one of these globs are quantized.
        options: the method's settings, read into its typed config (`calibration`), which names unknown fields.
        source: paper / reference code the recipe follows.

    `calibration` is the method's typed config built from `options`, and `needs_data` says whether the
    method calibrates on samples of the denoiser's inputs.
    """

    name: str
    description: str
    weight: QuantSpec
    act: QuantSpec | None = None
    method: str = "rtn"
    layers: tuple[str, ...] = LAYER_KINDS
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    calibration: CalibratorConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", load_config(self.method, dict(self.options), origin=f"recipe {self.name!r}"))

    @property
    def needs_data(self) -> bool:
        """Whether the recipe's method calibrates on samples of the denoiser's inputs."""
        return self.calibration.needs_data

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["weight"] = spec_to_dict(self.weight)
        d["act"] = None if self.act is None else spec_to_dict(self.act)
        d["layers"], d["skip"], d["only"] = list(self.layers), list(self.skip), list(self.only)
        return d

    @classmethod
    def from_dict(cls, d: dict, origin: str = "recipe") -> "Recipe":
        """Build a recipe from a dict; unknown or ill-typed fields raise a DQError naming the field.

        `needs_data`, which checkpoints written before it became a property of the method carry, is
        accepted when it agrees with the method.
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        d = dict(d)
        legacy_needs_data = d.pop("needs_data", None)
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise DQError(f"{origin}: unknown field(s) {unknown}; allowed fields: {sorted(fields)}.")
        for required in ("name", "weight"):
            if required not in d:
                raise DQError(f"{origin}: missing required field {required!r}.")
        _expect(origin, d, "name", str)
        _expect(origin, d, "description", str)
        _expect(origin, d, "method", str)
        _expect(origin, d, "options", dict)
        _expect(origin, d, "source", str)
        _expect(origin, d, "weight", dict)
        if d.get("act") is not None:
            _expect(origin, d, "act", dict)
        kw = dict(d)
        for key in ("layers", "skip", "only"):
            if key in kw:
                _expect(origin, d, key, list)
                if not all(isinstance(v, str) for v in kw[key]):
                    raise DQError(f"{origin}: field {key!r} must be a list of strings, got {kw[key]!r}.")
                kw[key] = tuple(kw[key])
        bad_layers = set(kw.get("layers", ())) - set(LAYER_KINDS)
        if bad_layers:
            raise DQError(f"{origin}: field 'layers' has {sorted(bad_layers)}; allowed: {list(LAYER_KINDS)}.")
        try:
            kw["weight"] = spec_from_dict(d["weight"])
            kw["act"] = None if d.get("act") is None else spec_from_dict(d["act"])
        except DQError as e:
            raise DQError(f"{origin}: {e}") from None
        kw.setdefault("description", "")
        recipe = cls(**kw)
        if legacy_needs_data is not None and legacy_needs_data != recipe.needs_data:
            raise DQError(
                f"{origin}: needs_data={legacy_needs_data!r} contradicts method {recipe.method!r}, which "
                f"{'calibrates on data' if recipe.needs_data else 'is data-free'}; drop the field (the method decides it)."
            )
        return recipe


def _expect(origin: str, d: dict, key: str, typ: type) -> None:
    if key in d and not isinstance(d[key], typ):
        raise DQError(f"{origin}: field {key!r} must be {typ.__name__}, got {type(d[key]).__name__} ({d[key]!r}).")


def bundled_recipe_names() -> list[str]:
    """Names of the recipes shipped as YAML files beside this module."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A Recipe from a bundled name, a YAML path, or a Recipe (returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DQError(f"recipe file {str(path)!r} does not exist.")
    else:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise DQError(
                f"unknown recipe {str(name_or_path)!r}; available: {', '.join(bundled_recipe_names())} "
                "(or pass a path to a recipe .yaml file)."
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DQError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise DQError(f"recipe file {str(path)!r} must hold a mapping of fields, got {type(data).__name__}.")
    return Recipe.from_dict(data, origin=f"recipe {path.name}")
