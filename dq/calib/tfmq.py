"""TFMQ-DM: temporal information block reconstruction (TIAR) and finite set calibration (FSC).

Following TFMQ-DM's paper and code (see the anchors):

- Temporal information block (TIB): everything that turns the timestep t into features, and depends
  on t only. UNet: `time_embedding` (its first linear is kept in float, as the released code does)
  and every resnet's `time_emb_proj`. DiT (PixArt): `adaln_single` (timestep embedder MLP and the
  adaLN modulation linear). dq's walker keeps time embedders in float by default; TFMQ quantizes them,
  so this calibrator swaps the TIB layers in itself.
- TIAR: AdaRound on the TIB layers only, with the loss the sum of MSEs over all TIB outputs (the time
  embedding and every projection), evaluated at every timestep of the sampling schedule. The input
  is t alone, so this needs no image data.
- The rest is reconstructed block by block as in Q-Diffusion (BRECQ/AdaRound), excluding TIB layers.
- FSC: every static activation quantizer gets one parameter set per timestep of the finite sampling
  schedule (the code's variant; the paper's covers the TIB activations), set by min-max for TIB
  layers and the Lp search for the others, and chosen per step by the timestep hook.

The paper reports TFMQ about 2x faster to calibrate than BRECQ on LDM Bedrooms.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dq.calib.adaround import TempDecay, attach_adaround, harden, rounding_loss
from dq.calib.collect import calibration_data
from dq.calib.qdiffusion import ReconOptions, _check_layers, apply_split_shortcuts, frozen_parameters, init_weight_scales, reconstruct_weights
from dq.calib.registry import CALIBRATORS, CalibContext
from dq.calib.state import quant_state
from dq.calib.timestep import calibrate_activations
from dq.errors import DQError
from dq.nn.swap import FLOAT_LAYER_KIND, LayerPlan, swap_layers
from dq.quant import PerGroup, PerToken

logger = logging.getLogger(__name__)

TFMQ_OPTIONS = ("tib_iters", "keep_first_time_linear", "fsc")


@dataclass
class TemporalBlock:
    """The TIB of a denoiser: its layer names (quantized and kept-float) and t -> list of outputs."""

    layers: list[str]
    keep_float: list[str]
    outputs: Callable[[torch.Tensor], list[torch.Tensor]]


def find_temporal_block(denoiser: nn.Module, keep_first_linear: bool = True) -> TemporalBlock:
    """Detect the TIB of a UNet (time_embedding + time_emb_proj) or a DiT with adaln_single."""
    dtype = next(denoiser.parameters()).dtype
    if hasattr(denoiser, "time_embedding") and hasattr(denoiser, "time_proj"):
        cfg = getattr(denoiser, "config", {})
        for key in ("class_embed_type", "addition_embed_type"):
            if cfg.get(key) is not None:
                raise DQError(
                    f"TFMQ's temporal block takes only t, but this UNet adds a {key}={cfg.get(key)!r} embedding to it; "
                    "use the qdiffusion recipe for this model."
                )
        projs = [(n, m) for n, m in denoiser.named_modules() if n.endswith("time_emb_proj") and isinstance(m, nn.Module)]
        resnets = {n.rsplit(".", 1)[0]: denoiser.get_submodule(n.rsplit(".", 1)[0]) for n, _ in projs}

        def unet_outputs(t: torch.Tensor) -> list[torch.Tensor]:
            emb = denoiser.time_embedding(denoiser.time_proj(t).to(dtype))
            return [emb] + [r.time_emb_proj(r.nonlinearity(emb)) for r in resnets.values()]

        names = [n for n, m in denoiser.time_embedding.named_modules(prefix="time_embedding") if type(m) in FLOAT_LAYER_KIND]
        names += [n for n, _ in projs]
        first = names[:1] if keep_first_linear else []
        return TemporalBlock([n for n in names if n not in first], first, unet_outputs)
    if hasattr(denoiser, "adaln_single"):
        ada = denoiser.adaln_single
        if getattr(ada.emb, "use_additional_conditions", False):
            raise DQError("TFMQ's temporal block takes only t; this DiT also embeds resolution/aspect ratio. Use another recipe.")

        def dit_outputs(t: torch.Tensor) -> list[torch.Tensor]:
            mod, emb = ada(t, {"resolution": None, "aspect_ratio": None}, batch_size=t.shape[0], hidden_dtype=dtype)
            return [mod, emb]

        names = [n for n, m in ada.named_modules(prefix="adaln_single") if type(m) in FLOAT_LAYER_KIND]
        first = [n for n in names if n.endswith("linear_1")][:1] if keep_first_linear else []
        return TemporalBlock([n for n in names if n not in first], first, dit_outputs)
    raise DQError(
        f"TFMQ found no temporal information block in {type(denoiser).__name__}: expected a UNet with "
        "time_embedding/time_emb_proj or a DiT with adaln_single. Use the qdiffusion or ptq4dm recipe."
    )


def _fits(spec: Any, in_features: int) -> bool:
    g = None if spec is None else spec.granularity
    size = getattr(g, "group_size", None) if isinstance(g, (PerGroup, PerToken)) else None
    return not size or in_features % size == 0


def quantize_tib_layers(denoiser: nn.Module, layers: dict[str, nn.Module], tib: TemporalBlock, recipe: Any) -> list[str]:
    """Swap in the TIB layers the walker's default skip list kept in float; returns the added names.

    The recipe's own `skip` and `only` patterns still apply: only dq's default skip list is overridden.
    """
    plans = {}
    for name in tib.layers:
        if name in layers or any(fnmatch(name, p) for p in recipe.skip):
            continue
        if recipe.only and not any(fnmatch(name, p) for p in recipe.only):
            continue
        module = denoiser.get_submodule(name)
        kind = FLOAT_LAYER_KIND.get(type(module))
        if kind is None:
            continue
        in_f = module.in_features if kind == "linear" else module.weight[0].numel()
        act_c = module.in_features if kind == "linear" else module.in_channels
        if _fits(recipe.weight, in_f) and _fits(recipe.act, act_c):
            plans[name] = LayerPlan(kind, recipe.weight, recipe.act)
        else:
            logger.warning("dq: TIB layer %s does not fit the recipe's group size; kept in float", name)
    layers.update(swap_layers(denoiser, plans))
    return list(plans)


def tiar(denoiser: nn.Module, layers: dict[str, nn.Module], tib: TemporalBlock, timesteps: list[float], opts: ReconOptions, iters: int) -> float:
    """Reconstruct the TIB with AdaRound on all schedule timesteps; returns learned / nearest loss."""
    members = {n: layers[n] for n in tib.layers if n in layers}
    if not members or iters == 0:
        return 1.0
    device = next(denoiser.parameters()).device
    t = torch.tensor(sorted(set(timesteps)), device=device)
    with quant_state(denoiser, weights=False, acts=False), torch.no_grad():
        targets = [o.detach() for o in tib.outputs(t)]

    def loss_fn() -> torch.Tensor:
        outs = tib.outputs(t)
        return sum(((o.float() - y.float()) ** 2).mean() for o, y in zip(outs, targets))

    with quant_state(denoiser, weights=True, acts=False), torch.no_grad():
        nearest = float(loss_fn())
    roundings = [r for n, layer in members.items() for r in attach_adaround(n, layer)]
    opt = torch.optim.Adam([r.alpha for r in roundings], lr=opts.lr)
    decay = TempDecay(iters, opts.warmup, (opts.b_start, opts.b_end))
    with quant_state(denoiser, weights=True, acts=False), torch.enable_grad():
        for it in tqdm(range(iters), desc="dq: TIAR", leave=False):
            loss = loss_fn() + rounding_loss(roundings, it, decay, opts.reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    harden(roundings)
    with quant_state(denoiser, weights=True, acts=False), torch.no_grad():
        learned = float(loss_fn())
    return learned / max(nearest, 1e-30)


@CALIBRATORS.register("tfmq")
def calibrate_tfmq(denoiser: nn.Module, layers: dict[str, nn.Module], recipe: Any, context: CalibContext) -> None:
    """TFMQ-DM (Huang et al., CVPR 2024): TIAR for the temporal block, BRECQ for the rest, FSC activations."""
    opts, extra = ReconOptions.from_recipe(recipe, extra=TFMQ_OPTIONS)
    fsc = extra.get("fsc", "all")
    if fsc not in ("all", "tib"):
        raise DQError(f"recipe {recipe.name!r}: option fsc={fsc!r}; allowed: 'all' (TFMQ code) or 'tib' (paper).")
    tib = find_temporal_block(denoiser, bool(extra.get("keep_first_time_linear", True)))
    data = calibration_data(context, recipe, sampling="all")
    quantize_tib_layers(denoiser, layers, tib, recipe)
    _check_layers(layers, list(layers))
    if opts.split_shortcut:
        apply_split_shortcuts(denoiser, layers, conv1=opts.split_conv1)
    init_weight_scales(layers, opts.weight_observer)
    tib_set = set(tib.layers)
    steps = len({s.timestep for s in data.samples})
    with frozen_parameters(denoiser):
        ratio = tiar(denoiser, layers, tib, data.schedule, opts, int(extra.get("tib_iters", opts.iters)))
        logger.info("dq: TIAR loss %.3g x of nearest rounding", ratio)
        reconstruct_weights(denoiser, layers, data, opts, exclude=tib_set)
        tib_layers = {n: layers[n] for n in tib.layers if n in layers}
        rest = {n: l for n, l in layers.items() if n not in tib_set}
        calibrate_activations(denoiser, tib_layers, data, "minmax", steps, opts.batch_size)
        rest_groups = steps if fsc == "all" else opts.timestep_groups
        calibrate_activations(denoiser, rest, data, opts.act_observer, rest_groups, opts.batch_size)
