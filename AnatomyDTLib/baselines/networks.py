"""The deep-learning baselines of Table 1: U-Net, ConvLSTM and NeuralODE forecasters.

Each one maps a batch (:class:`AnatomyDTLib.models.data.Batch`: baseline one-hot field p0,
body mask, treatment variables, follow-up days) to the forecast field (B, K, *S) at each case's
follow-up day, on the simplex (:func:`.common.residual_forecast`). 2D or 3D by the data.

* **U-Net** (Ronneberger et al. 2015): a 3-level encoder–decoder with skip connections reads p0
  and predicts the follow-up in one shot; the treatment features at the follow-up day (treated,
  dose, time = interval) enter as constant channels appended to the input of every block.
* **ConvLSTM** (Shi et al. 2015), encoder–forecaster form: an encoder maps p0 and the day-0
  treatment features to half resolution; a convolutional LSTM cell is unrolled over n = ceil(T /
  ``step_days``) equal steps up to the follow-up day T, reading the encoded baseline, the
  treatment features at the end of each step and the step length; a decoder reads the final
  hidden state (upsampled) and p0 and outputs the logit correction.
* **NeuralODE** (Chen et al. 2018): an encoder maps p0 and the day-0 treatment features to a
  latent field z(0) at half resolution; dz/dt = f(z, features(t)) is integrated with
  ``torchdiffeq.odeint`` (fixed-step RK4, n = ceil(T / ``step_days``) equal steps landing on the
  follow-up day T, ``step_days`` = 20 by default; time in units of 100 days); a decoder reads
  z(T) and p0 and outputs the logit correction.

Sizes are kept small (16 hidden channels) so that all three train on the 2-core CPU in minutes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import (NUM_FEATURES, TIME_SCALE_DAYS, body_mask, case_days, check_static_batch, constant_channels,
                     conv_layer, residual_forecast, treatment_features, zero_head)


def _block(ndim: int, cin: int, cout: int) -> nn.Sequential:
    """Two 3×3(×3) convolutions with SiLU.

    No normalisation layer: a per-channel normalisation (GroupNorm with one channel per group,
    InstanceNorm) would subtract exactly the constant offset that the treatment channels add,
    i.e. remove the treatment from the input.
    """
    conv = conv_layer(ndim)
    return nn.Sequential(conv(cin, cout, 3, padding=1, padding_mode="replicate"), nn.SiLU(),
                         conv(cout, cout, 3, padding=1, padding_mode="replicate"), nn.SiLU())


class UNetForecaster(nn.Module):
    """U-Net of p0 → logit correction at the follow-up day; treatment as constant channels at every block.

    The treatment features at the follow-up day (time = interval/100 d, treated, dose/60 Gy, ...)
    are appended as constant channels to the input of every encoder and decoder block, so they
    reach the output through a short path as well as through the bottleneck.
    """

    LEVELS = 3

    def __init__(self, num_classes: int, ndim: int, hidden: int = 16):
        super().__init__()
        self.ndim = ndim
        widths = [hidden * 2 ** i for i in range(self.LEVELS + 1)]  # e.g. 16, 32, 64, 128
        f = NUM_FEATURES
        self.down = nn.ModuleList()
        cin = num_classes
        for w in widths[:-1]:
            self.down.append(_block(ndim, cin + f, w))
            cin = w
        self.bottom = _block(ndim, widths[-2] + f, widths[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(self.LEVELS)):
            self.up.append(conv_layer(ndim)(widths[i + 1], widths[i], 1))
            self.dec.append(_block(ndim, 2 * widths[i] + f, widths[i]))
        self.head = zero_head(ndim, widths[0], num_classes)

    def _pool(self, x):
        return F.max_pool2d(x, 2) if self.ndim == 2 else F.max_pool3d(x, 2)

    def forward(self, batch) -> torch.Tensor:
        check_static_batch(batch)
        p0 = batch.p0
        spatial = tuple(p0.shape[2:])
        feats = treatment_features(batch.treatments, case_days(batch), device=p0.device)

        def with_treatment(x):
            return torch.cat([x, constant_channels(feats, tuple(x.shape[2:]))], dim=1)

        x = p0
        multiple = 2 ** self.LEVELS
        pad = [(-n) % multiple for n in spatial]
        if any(pad):  # replicate-pad to a multiple of 2^levels, crop back at the end
            x = F.pad(x, [v for n in reversed(pad) for v in (0, n)], mode="replicate")
        skips = []
        for block in self.down:
            x = block(with_treatment(x))
            skips.append(x)
            x = self._pool(x)
        x = self.bottom(with_treatment(x))
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = dec(with_treatment(torch.cat([up(x), skip], dim=1)))
        delta = self.head(x)[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
        return residual_forecast(p0, delta, body_mask(batch))


def _step_schedule(days: list[float], step_days: float) -> tuple[list[int], list[float]]:
    """Per case: number of steps n = ceil(T / step_days) and step length T / n (days).

    Each case's steps depend only on its own follow-up day T (not on the other cases of its
    batch), so a forecast is the same in a batch and alone.
    """
    counts = [max(1, math.ceil(d / step_days - 1e-9)) for d in days]
    return counts, [d / n for d, n in zip(days, counts)]


class _LatentCodec(nn.Module):
    """Half-resolution encoder of (p0, day-0 treatment features) and decoder of (latent, p0) → forecast."""

    def __init__(self, num_classes: int, ndim: int, hidden: int):
        super().__init__()
        conv = conv_layer(ndim)
        self.ndim = ndim
        self.encoder = nn.Sequential(
            conv(num_classes + NUM_FEATURES, hidden, 3, padding=1, padding_mode="replicate"), nn.SiLU(),
            conv(hidden, hidden, 3, stride=2, padding=1, padding_mode="replicate"), nn.SiLU())
        self.decoder = nn.Sequential(conv(hidden + num_classes, hidden, 3, padding=1, padding_mode="replicate"),
                                     nn.SiLU())
        self.head = zero_head(ndim, hidden, num_classes)

    def encode(self, batch) -> torch.Tensor:
        """(B, hidden, ceil(S/2)) latent of the baseline and the treatment on day 0."""
        p0 = batch.p0
        feats0 = treatment_features(batch.treatments, [0.0] * p0.shape[0], device=p0.device)
        return self.encoder(torch.cat([p0, constant_channels(feats0, tuple(p0.shape[2:]))], dim=1))

    def decode(self, batch, z: torch.Tensor) -> torch.Tensor:
        """Forecast field from the latent at the follow-up day (upsampled) and p0."""
        p0 = batch.p0
        up = F.interpolate(z, size=tuple(p0.shape[2:]), mode="bilinear" if self.ndim == 2 else "trilinear",
                           align_corners=False)
        delta = self.head(self.decoder(torch.cat([up, p0], dim=1)))
        return residual_forecast(p0, delta, body_mask(batch))


class ConvLSTMForecaster(nn.Module):
    """Encoder → ConvLSTM unrolled over steps of ≤ ``step_days`` (half resolution) → decoder.

    The encoder reads p0 and the day-0 treatment features once (stride 2). Every step the cell
    reads the encoded baseline, the treatment features at the end of the step and the step
    length; the decoder reads the hidden state after a case's last step (upsampled) and p0.
    """

    def __init__(self, num_classes: int, ndim: int, hidden: int = 16, step_days: float = 10.0):
        super().__init__()
        conv = conv_layer(ndim)
        self.hidden = hidden
        self.step_days = float(step_days)
        self.codec = _LatentCodec(num_classes, ndim, hidden)
        self.gates = conv(2 * hidden + NUM_FEATURES + 1, 4 * hidden, 3, padding=1, padding_mode="replicate")

    def forward(self, batch) -> torch.Tensor:
        check_static_batch(batch)
        p0 = batch.p0
        days = case_days(batch)
        counts, lengths = _step_schedule(days, self.step_days)
        x = self.codec.encode(batch)
        latent = tuple(x.shape[2:])
        h = torch.zeros_like(x)
        c = torch.zeros_like(x)
        step = torch.tensor([[v / self.step_days] for v in lengths], dtype=p0.dtype, device=p0.device)
        states = []
        for s in range(1, max(counts) + 1):
            ends = [min(s, n) * v for n, v in zip(counts, lengths)]
            feats = torch.cat([treatment_features(batch.treatments, ends, device=p0.device), step], dim=1)
            i, f, o, g = torch.chunk(self.gates(torch.cat([x, h, constant_channels(feats, latent)], dim=1)), 4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        index = torch.as_tensor([n - 1 for n in counts], device=p0.device)
        return self.codec.decode(batch, torch.stack(states)[index, torch.arange(len(days), device=p0.device)])


class _LatentDynamics(nn.Module):
    """dz/dt = f(z, treatment features at t): two convolutions, the last one starting at zero."""

    def __init__(self, ndim: int, channels: int, treatments):
        super().__init__()
        conv = conv_layer(ndim)
        self.net = nn.Sequential(conv(channels + NUM_FEATURES, channels, 3, padding=1, padding_mode="replicate"),
                                 nn.SiLU(), conv(channels, channels, 3, padding=2, dilation=2, padding_mode="replicate"),
                                 nn.SiLU())
        self.out = zero_head(ndim, channels, channels)
        self.treatments = treatments

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        day = float(t) * TIME_SCALE_DAYS
        feats = treatment_features(self.treatments, [day] * z.shape[0], device=z.device)
        return self.out(self.net(torch.cat([z, constant_channels(feats, tuple(z.shape[2:]))], dim=1)))


class NeuralODEForecaster(nn.Module):
    """Encoder → latent ODE (torchdiffeq, fixed-step RK4) to each follow-up day → decoder."""

    def __init__(self, num_classes: int, ndim: int, hidden: int = 16, step_days: float = 20.0, method: str = "rk4"):
        super().__init__()
        self.hidden = hidden
        self.step_days = float(step_days)
        self.method = method
        self.codec = _LatentCodec(num_classes, ndim, hidden)
        self.dynamics = _LatentDynamics(ndim, hidden, None)

    def forward(self, batch) -> torch.Tensor:
        from torchdiffeq import odeint

        check_static_batch(batch)
        p0 = batch.p0
        days = case_days(batch)
        z0 = self.codec.encode(batch)
        z_t = torch.empty_like(z0)
        for day in sorted(set(days)):  # each follow-up day: n equal RK4 steps of <= step_days landing on it
            items = [b for b, d in enumerate(days) if d == day]
            steps = max(1, math.ceil(day / self.step_days - 1e-9))
            self.dynamics.treatments = [batch.treatments[b] for b in items]
            try:
                grid = torch.tensor([0.0, day / TIME_SCALE_DAYS], dtype=p0.dtype, device=p0.device)
                zs = odeint(self.dynamics, z0[items], grid, method=self.method,
                            options={"step_size": day / steps / TIME_SCALE_DAYS})
            finally:
                self.dynamics.treatments = None
            z_t[items] = zs[-1]
        return self.codec.decode(batch, z_t)
