"""Closed-form solutions and small field builders used by the solver verification tests."""

from __future__ import annotations

import math

import torch


def grid_coordinates(shape, spacing, center=None, dtype=torch.float64):
    """Physical coordinates (mm) of cell centres, one tensor per axis, centred on ``center`` (default: grid centre)."""
    axes = []
    for n, h in zip(shape, spacing):
        axes.append((torch.arange(n, dtype=dtype) - (n - 1) / 2.0) * h)
    mesh = torch.meshgrid(*axes, indexing="ij")
    if center is not None:
        mesh = tuple(m - c for m, c in zip(mesh, center))
    return mesh


def heat_kernel_gaussian(shape, spacing, sigma0_mm, amplitude, diffusion, t_days, dtype=torch.float64):
    """Exact solution of ∂t u = D Δu in free space from A·exp(-r²/2σ0²): a spreading Gaussian."""
    var = sigma0_mm ** 2 + 2.0 * diffusion * t_days
    r2 = sum(c ** 2 for c in grid_coordinates(shape, spacing, dtype=dtype))
    d = len(shape)
    return amplitude * (sigma0_mm ** 2 / var) ** (d / 2) * torch.exp(-r2 / (2 * var))


def two_class_field(tumour):
    """(2, *S) field [background, tumour] from a tumour probability map."""
    return torch.stack([1.0 - tumour, tumour])
