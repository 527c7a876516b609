"""A small procedural brain phantom: nested ellipsoids for cortex, white matter, ventricles and a tumour.

Not anatomy: a geometric stand-in with the right class layout, used when no atlas or sample case
is available (tests, quick checks). Deterministic; sizes in mm, array order (z, y, x), LPS
geometry with identity direction.
"""

from __future__ import annotations

import numpy as np

from .io import Geometry
from .schema import BRAIN_SCHEMA

FLAIR_INTENSITY = {"background": 0.0, "tumour": 1.1, "white_matter": 0.55, "grey_matter": 0.75,
                   "lateral_ventricles": 0.08}
"""FLAIR-like intensity per class (arbitrary units): bright lesion, grey above white, dark CSF."""


def ellipsoid_brain(shape=(48, 56, 48), spacing_mm=(3.0, 3.0, 3.0), tumour_centre_mm=(6.0, -10.0, 14.0),
                    tumour_radius_mm=9.0) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Labels (brain schema), a FLAIR-like image and the geometry of an ellipsoidal brain.

    Layout: a brain ellipsoid of semi-axes 0.42 × the field of view; a 4 mm thick cortex shell;
    two lateral ventricles (small ellipsoids either side of the midline); a spherical tumour at
    ``tumour_centre_mm`` (relative to the volume centre, (z, y, x) in mm) inside white matter.
    """
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * h for n, h in zip(shape, spacing_mm)], indexing="ij")
    semi = [0.42 * n * h for n, h in zip(shape, spacing_mm)]
    brain_r = np.sqrt((zz / semi[0]) ** 2 + (yy / semi[1]) ** 2 + (xx / semi[2]) ** 2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[brain_r <= 1.0] = BRAIN_SCHEMA.index("grey_matter")
    cortex_thickness = 4.0 / min(semi)
    labels[brain_r <= 1.0 - cortex_thickness] = BRAIN_SCHEMA.index("white_matter")
    for side in (-1, 1):
        vent = ((zz / (0.12 * semi[0] * 2)) ** 2 + ((yy + 0.05 * semi[1]) / (0.45 * semi[1])) ** 2
                + ((xx - side * 0.18 * semi[2]) / (0.08 * semi[2] * 1.5)) ** 2)
        labels[vent <= 1.0] = BRAIN_SCHEMA.index("lateral_ventricles")
    cz, cy, cx = tumour_centre_mm
    tumour = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= tumour_radius_mm ** 2
    labels[tumour & (labels > 0)] = BRAIN_SCHEMA.tumour_index
    flair = np.zeros(shape, dtype=np.float32)
    for name, value in FLAIR_INTENSITY.items():
        flair[labels == BRAIN_SCHEMA.index(name)] = value
    geometry = Geometry(spacing=tuple(reversed([float(h) for h in spacing_mm])))
    return labels, flair, geometry
