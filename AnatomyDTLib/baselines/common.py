"""Pieces every baseline shares: treatment features, the residual output head, the body mask.

All baselines read the same inputs as the learned model (docs/learning.md, "Treatment
conditioning"): the one-hot baseline field p0 (B, K, *S) and the synthetic treatment variables
``treated``, ``dose_gy`` (Gy, read as delivered on day 0) and ``interval_days`` (the forecast
horizon). The treatment enters through :class:`AnatomyDTLib.models.conditioning.Conditioning`,
so a baseline sees exactly the features the learned model's FiLM layers see, evaluated at the
time the baseline needs them (the follow-up day for the U-Net, every step for the ConvLSTM and
the NeuralODE).

Output convention (every neural baseline): the network produces a logit correction δ and the
forecast is ``softmax(log(p0 + ε) + δ)`` inside the body and p0 outside it. The last layer starts
at zero, so an untrained baseline predicts "no change" (the identity baseline) rather than noise,
just as the learned model starts from the pure PDE. The forecast is on the simplex by
construction. ε = 0.05 keeps the starting softmax away from saturation: with ε = 10⁻³ the
one-hot input gives probabilities 0.996/0.001, whose softmax gradient p(1 − p) is so small that
the networks stayed at the identity plateau in some folds; with 0.05 they start at ~0.84 for
the baseline class (argmax unchanged) and the soft-Dice gradient is ~30× larger.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..models.conditioning import NUM_FEATURES, Conditioning

LOG_EPS = 0.05  # ε of log(p0 + ε): finite, not saturated logits for one-hot inputs (see module docstring)
TIME_SCALE_DAYS = 100.0  # days per unit of the NeuralODE's time axis (same scale as the 'time' feature)


def treatment_features(treatments: Sequence[dict], days: Sequence[float], *, device=None) -> torch.Tensor:
    """(B, F) conditioning features of case b at ``days[b]`` days after the baseline.

    F = :data:`~AnatomyDTLib.models.conditioning.NUM_FEATURES`: time/100 d, treated, cumulative
    dose/60 Gy, days since RT start/100, and the (here zero) chemotherapy and surgery features.
    """
    if len(treatments) != len(days):
        raise InputError(f"{len(treatments)} treatments for {len(days)} forecast days.")
    cond = Conditioning.from_static(treatments)
    rows = [cond.features(float(d))[b] for b, d in enumerate(days)]
    return torch.stack(rows).to(device=device, dtype=torch.float32)


def constant_channels(features: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Broadcast (B, F) features to constant image channels (B, F, *S)."""
    ones = (1,) * len(spatial_shape)
    return features.reshape(features.shape + ones).expand(tuple(features.shape) + tuple(spatial_shape))


def case_days(batch) -> list[float]:
    """Follow-up day of every batch item (one target per synthetic case)."""
    index = list(batch.day_index)
    if len(index) != batch.p0.shape[0]:
        raise InputError("The baselines forecast one follow-up per case (synthetic pairs); this batch has "
                         f"{len(index)} targets for {batch.p0.shape[0]} cases.")
    return [float(batch.days[i]) for i in index]


def check_static_batch(batch) -> None:
    """The baselines take static treatment variables; a treatment plan (brain cohorts) is not supported."""
    if getattr(batch, "plan", None) is not None:
        raise InputError("The baselines support the synthetic datasets (static treatment variables), not cases "
                         "with a treatment plan.")


def body_mask(batch) -> torch.Tensor | None:
    """(B, 1, *S) boolean body mask of the batch, or None when the dynamics run everywhere."""
    if batch.mask is None:
        return None
    return (batch.mask > 0.5).unsqueeze(1)


def residual_forecast(p0: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(log(p0 + ε) + δ) inside the mask, p0 outside: a field on the simplex."""
    out = torch.softmax(torch.log(p0.clamp(min=0.0) + LOG_EPS) + delta, dim=1)
    if mask is not None:
        out = torch.where(mask, out, p0)
    return out


def conv_layer(ndim: int):
    """nn.Conv2d or nn.Conv3d by the data's dimension."""
    if ndim not in (2, 3):
        raise InputError(f"The baselines work on 2D or 3D fields, got {ndim} spatial axes.")
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def zero_head(ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """1×1 convolution with zero weight and bias: the baseline starts as the identity forecast."""
    head = conv_layer(ndim)(in_channels, out_channels, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


__all__ = ["NUM_FEATURES", "treatment_features", "constant_channels", "case_days", "check_static_batch", "body_mask",
           "residual_forecast", "conv_layer", "zero_head", "LOG_EPS", "TIME_SCALE_DAYS"]
