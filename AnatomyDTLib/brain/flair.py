"""A FLAIR-like image from tissue fractions: what the atlas, the phantom and completion all look at.

FLAIR (fluid-attenuated inversion recovery) suppresses free water, so CSF is dark, grey matter
is brighter than white matter, and oedema/infiltrated tumour is the brightest tissue. We
reproduce that contrast with fixed intensities (arbitrary units, a skull-stripped image with
0 outside the brain, as BraTS-style data are)::

    background 0      CSF / cavity 0.08      white matter 0.55      grey matter 0.75
    tumour and oedema 1.1

mixed voxel by voxel by tissue fraction (partial volume), then blurred by a Gaussian of
``smooth_mm`` (the scanner's point spread) and multiplied by a smooth bias field (coil
inhomogeneity, a few per cent). Optional Rician noise makes phantom scans look acquired.

This is a *synthetic* image: it has FLAIR's contrast ordering, not its physics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

#: FLAIR-like intensity of each pure tissue (arbitrary units).
FLAIR_INTENSITY = {
    "background": 0.0,
    "csf": 0.08,
    "white_matter": 0.55,
    "grey_matter": 0.75,
    "lesion": 1.1,
}

#: Bias-field coefficients of the atlas image: (x, y, z, x^2 - y^2) in normalised coordinates.
ATLAS_BIAS = (0.035, -0.025, 0.03, 0.02)


def bias_field(shape: Sequence[int], coefficients: Sequence[float] = ATLAS_BIAS) -> np.ndarray:
    """Smooth multiplicative bias ``1 + c0 x + c1 y + c2 z + c3 (x^2 - y^2)`` (dimensionless).

    ``x, y, z`` run from -1 to 1 across the grid (array axes 2, 1, 0), so the coefficients are
    the relative intensity change from the centre to the edge of the field of view (0.03 = 3 %).
    """
    shape = tuple(int(s) for s in shape)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z = axes[0].reshape(-1, 1, 1)
    y = axes[1].reshape(1, -1, 1)
    x = axes[2].reshape(1, 1, -1)
    c = list(coefficients) + [0.0] * (4 - len(coefficients))
    return (1.0 + c[0] * x + c[1] * y + c[2] * z + c[3] * (x * x - y * y)).astype(np.float32)


def flair_like(white_matter: np.ndarray, grey_matter: np.ndarray, csf: np.ndarray, *,
               spacing_mm: Sequence[float], lesion: np.ndarray | None = None, brain_mask: np.ndarray | None = None,
               smooth_mm: float = 1.0, bias: Sequence[float] | None = ATLAS_BIAS, noise_sd: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """FLAIR-like image (float32, arbitrary units) from tissue fractions on one grid.

    Args:
        white_matter, grey_matter, csf: tissue fractions in [0, 1] (array order z, y, x); the
            remainder up to 1 is background (intensity 0).
        spacing_mm: voxel size in mm in array order, for the blur.
        lesion: optional tumour/oedema fraction in [0, 1]; it replaces that fraction of the tissue
            signal by the lesion intensity 1.1.
        brain_mask: if given, the image is 0 outside it (skull-stripped), after blurring.
        smooth_mm: standard deviation of the Gaussian blur in mm (0 = none).
        bias: bias-field coefficients (see :func:`bias_field`), or None for no bias.
        noise_sd: standard deviation of Rician noise inside the brain (0 = none), in image units.
        rng: random generator for the noise (required when ``noise_sd > 0``).
    """
    f = FLAIR_INTENSITY
    image = (f["white_matter"] * np.asarray(white_matter, np.float32)
             + f["grey_matter"] * np.asarray(grey_matter, np.float32)
             + f["csf"] * np.asarray(csf, np.float32))
    if lesion is not None:
        w = np.clip(np.asarray(lesion, np.float32), 0.0, 1.0)
        tissue = np.clip(np.asarray(white_matter, np.float32) + np.asarray(grey_matter, np.float32)
                         + np.asarray(csf, np.float32), 0.0, 1.0)
        image = (1.0 - w) * image + w * f["lesion"] * np.maximum(tissue, w)
    if smooth_mm > 0:
        image = ndi.gaussian_filter(image, [smooth_mm / s for s in spacing_mm], mode="nearest")
    if bias is not None:
        image = image * bias_field(image.shape, bias)
    if noise_sd > 0:
        if rng is None:
            raise ValueError("flair_like needs rng when noise_sd > 0")
        n1 = rng.normal(0.0, noise_sd, image.shape).astype(np.float32)
        n2 = rng.normal(0.0, noise_sd, image.shape).astype(np.float32)
        image = np.sqrt((image + n1) ** 2 + n2 ** 2)
    if brain_mask is not None:
        image = np.where(brain_mask, image, 0.0)
    return np.clip(image, 0.0, None).astype(np.float32)
