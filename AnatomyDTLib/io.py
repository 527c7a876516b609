"""Reading and writing volumes while keeping their geometry (spacing, origin, direction) exact.

Conventions used throughout AnatomyDT:

* **Array order.** Voxel arrays are in the order SimpleITK's ``GetArrayFromImage`` gives:
  ``(z, y, x)`` for 3D and ``(y, x)`` for 2D. ITK-ordered quantities (spacing, origin, size)
  are ``(x, y[, z])``; :attr:`Geometry.spacing_array_order` converts spacing to array order.
* **Physical space.** Millimetres in LPS (DICOM/ITK/3D Slicer), never RAS.
* **Labelmaps.** A voxel value ``v`` is class ``v`` of a :class:`~AnatomyDTLib.schema.ClassSchema`.
  ``.seg.nrrd`` files (3D Slicer segmentations) are mapped to classes by segment name.
* **Writes are atomic** (:func:`atomic_output`): a crash never leaves a half-written output,
  an existing output is never replaced unless ``force`` is given, and inputs are never modified.

This module imports neither Slicer nor Qt (nor torch), so it runs in any Python.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputExistsError
from .schema import DEFAULT_SCHEMA, ClassSchema

# Compound extensions first so that "x.seg.nrrd" is not mistaken for "x.nrrd".
_READ_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Single-file formats only: a detached header (.nhdr/.mhd) names its data file, which a rename would break.
_WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_SEGMENT_FIELD = re.compile(r"^Segment\d+_")
# Written into .seg.nrrd headers of 2D labelmaps (stored as one-slice 3D volumes, as 3D Slicer does).
_SPATIAL_DIMENSIONS_KEY = "AnatomyDT_SpatialDimensions"
_RESERVED_SEGMENT_TAGS = ("TerminologyEntry", "Segmentation.Status")
_FLOAT_LABEL_TOLERANCE = 1e-3  # a float-stored mask value must be this close to an integer
_SEG_NRRD_GZIP_LEVEL = 1  # label data compresses well at any level; level 9 is several times slower


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the patient: the physical part of an image header.

    Attributes:
        spacing: voxel size in mm, ITK order ``(x, y[, z])``.
        origin: physical position of voxel 0 in mm, LPS, ITK order. Defaults to zeros.
        direction: the ITK direction matrix (unit column vectors of the voxel axes in LPS),
            flattened row-major. Defaults to identity.

    The array shape is deliberately not part of the geometry; volume objects carry it.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...] = None  # type: ignore[assignment]
    direction: tuple[float, ...] = None  # type: ignore[assignment]

    def __post_init__(self):
        spacing = _float_tuple(self.spacing, "spacing")
        n = len(spacing)
        if n not in (2, 3):
            raise InputError(f"Only 2D and 3D volumes are supported; the spacing {spacing} has {n} values.")
        origin = (0.0,) * n if self.origin is None else _float_tuple(self.origin, "origin")
        direction = tuple(np.eye(n).ravel().tolist()) if self.direction is None else _float_tuple(self.direction, "direction")
        if len(origin) != n or len(direction) != n * n:
            raise InputError(
                f"Inconsistent geometry: {n} spacing values need {n} origin values and {n * n} direction values, "
                f"got {len(origin)} and {len(direction)}."
            )
        if not all(np.isfinite(spacing + origin + direction)):
            raise InputError(f"The geometry has non-finite values: spacing {spacing}, origin {origin}, direction {direction}.")
        if min(spacing) <= 0:
            raise InputError(f"Voxel spacing must be positive, got {spacing} mm.")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.spacing)

    @property
    def spacing_array_order(self) -> tuple[float, ...]:
        """Spacing in mm in numpy/torch array axis order ``(z, y, x)`` / ``(y, x)``, for filters and gradients."""
        return tuple(reversed(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction matrix as an ``(ndim, ndim)`` array (columns are voxel axes in LPS)."""
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (= cm³). A 2D pixel counts as a 1 mm thick slab."""
        return float(np.prod(self.spacing)) / 1000.0

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        """The geometry of a SimpleITK image."""
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on a SimpleITK image (in place) and return the image."""
        if image.GetDimension() != self.ndim:
            raise InputError(f"Cannot put a {self.ndim}D geometry on a {image.GetDimension()}D image.")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_ijk_to_lps(cls, matrix: Any) -> "Geometry":
        """The 3D geometry of a 4x4 voxel-index (i, j, k) to LPS-mm affine (as in .seg.nrrd files)."""
        m = np.asarray(matrix, dtype=float)
        if m.shape != (4, 4):
            raise InputError(f"An IJK-to-LPS matrix must be 4x4, got shape {m.shape}.")
        columns = m[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise InputError(f"The IJK-to-LPS matrix has a zero-length voxel axis: {m[:3, :3].tolist()}.")
        return cls(tuple(spacing), tuple(m[:3, 3]), tuple((columns / spacing).ravel()))

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 affine from voxel index (i, j, k) = (x, y, z index) to LPS position in mm.

        A 2D geometry is embedded as the slice k = 0 of a 3D grid (1 mm thick, z axis = S).
        """
        g = self if self.ndim == 3 else self.as_3d()
        affine = np.eye(4)
        affine[:3, :3] = g.direction_matrix * np.asarray(g.spacing)[np.newaxis, :]
        affine[:3, 3] = g.origin
        return affine

    def as_3d(self, slice_thickness_mm: float = 1.0) -> "Geometry":
        """A 3D geometry for a one-slice volume holding this 2D grid (identity along z)."""
        if self.ndim == 3:
            return self
        direction = np.eye(3)
        direction[:2, :2] = self.direction_matrix
        return Geometry(self.spacing + (slice_thickness_mm,), self.origin + (0.0,), tuple(direction.ravel()))

    def as_2d(self) -> "Geometry":
        """The 2D geometry of a one-slice 3D grid built by :meth:`as_3d` (refuses oblique slices)."""
        if self.ndim == 2:
            return self
        d = self.direction_matrix
        if not (np.allclose(d[:2, 2], 0.0, atol=1e-6) and np.allclose(d[2, :2], 0.0, atol=1e-6)):
            raise InputError("This one-slice volume is not in the x-y plane, so it cannot be read as a 2D image.")
        return Geometry(self.spacing[:2], self.origin[:2], tuple(d[:2, :2].ravel()))

    def matches(self, other: "Geometry", rtol: float = 1e-4, atol_mm: float = 1e-3) -> bool:
        """Whether two grids coincide: same dimension, spacing within ``rtol`` (relative), origin within
        ``atol_mm`` mm and direction cosines within ``rtol`` (absolute). Tolerances absorb the float32
        rounding of NIfTI headers."""
        if self.ndim != other.ndim:
            return False
        return (
            np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0.0)
            and np.allclose(self.origin, other.origin, rtol=0.0, atol=atol_mm)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=rtol)
        )

    def check_matches(self, other: "Geometry", what: str, *, shape: tuple[int, ...] | None = None,
                      other_shape: tuple[int, ...] | None = None) -> None:
        """Raise :class:`InputError` unless ``other`` is the same grid as ``self``.

        Args:
            other: the geometry to compare with (e.g. the follow-up scan's).
            what: what is being compared, e.g. ``"follow-up labelmap vs baseline"``, used in the message.
            shape, other_shape: the array shapes (array order), compared too when both are given.
        """
        same_shape = shape is None or other_shape is None or tuple(shape) == tuple(other_shape)
        if same_shape and self.matches(other):
            return
        raise InputError(
            f"{what}: the volumes are on different voxel grids:\n"
            f"  first:  {self.describe(shape)}\n"
            f"  second: {other.describe(other_shape)}\n"
            "Resample one onto the other's grid first (e.g. in 3D Slicer with 'Resample Scalar/Vector/DWI Volume' "
            "or 'Resample Image (BRAINS)', nearest-neighbour interpolation for labelmaps)."
        )

    def describe(self, shape: tuple[int, ...] | None = None) -> str:
        """One-line human description: size (x,y,z order) in voxels, spacing in mm, origin in mm (LPS)."""
        parts = []
        if shape is not None:
            parts.append("size " + "x".join(str(int(s)) for s in reversed(tuple(shape))) + " voxels")
        parts.append("spacing " + "x".join(f"{s:g}" for s in self.spacing) + " mm")
        parts.append("origin (" + ", ".join(f"{o:g}" for o in self.origin) + ") mm")
        if not np.allclose(self.direction_matrix, np.eye(self.ndim)):
            parts.append("direction " + "[" + ", ".join(f"{d:.4g}" for d in self.direction) + "]")
        return ", ".join(parts)


def _float_tuple(values: Any, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in np.asarray(values, dtype=float).ravel())
    except (TypeError, ValueError) as exc:
        raise InputError(f"The geometry {name} must be a sequence of numbers, got {values!r}.") from exc


# --------------------------------------------------------------------------------------------
# Label volumes
# --------------------------------------------------------------------------------------------


@dataclass
class LabelVolume:
    """A labelmap: one class index per voxel, with its geometry and class schema.

    Attributes:
        labels: integer array (uint8 or int16) in array order ``(z, y, x)`` or ``(y, x)``;
            value ``k`` means class ``schema.names[k]``.
        geometry: where the grid sits in the patient (mm, LPS).
        schema: the classes the values refer to.
        source: the file it was read from, or ``""``.
    """

    labels: np.ndarray
    geometry: Geometry
    schema: ClassSchema = DEFAULT_SCHEMA
    source: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        if not (np.issubdtype(self.labels.dtype, np.integer) or self.labels.dtype == bool):
            raise InputError(f"A labelmap needs integer labels, got dtype {self.labels.dtype}.")
        if self.labels.ndim != self.geometry.ndim:
            raise InputError(
                f"The labelmap array is {self.labels.ndim}D (shape {self.labels.shape}) but its geometry is {self.geometry.ndim}D."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape in array order."""
        return tuple(self.labels.shape)

    def class_voxel_counts(self) -> dict[str, int]:
        """Number of voxels of each class, by class name."""
        counts = np.bincount(self.labels.ravel().astype(np.int64), minlength=self.schema.num_classes)
        return {name: int(counts[k]) for k, name in enumerate(self.schema.names)}


# --------------------------------------------------------------------------------------------
# Paths and atomic output
# --------------------------------------------------------------------------------------------


def file_extension(path: str | os.PathLike, allowed: tuple[str, ...] = _READ_EXTENSIONS) -> str:
    """The lower-case (compound) extension of ``path`` among ``allowed``, e.g. ``".seg.nrrd"``, ``".nii.gz"``."""
    name = Path(path).name.lower()
    for ext in allowed:
        if name.endswith(ext):
            return ext
    raise InputError(f"Unsupported file type for '{path}'; use one of: {', '.join(allowed)}.")


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"Input file not found: '{p}'. Check the path (relative paths start at {os.getcwd()}).")
    if p.is_dir():
        raise InputError(f"'{p}' is a directory; give an image or segmentation file (DICOM series must be converted first).")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path in the same directory, then move it into place.

    The temporary name keeps the output's extension (``.tmp-XXXXXXXX.seg.nrrd``) so format-sniffing
    writers pick the right format. On success it is renamed onto ``path`` with :func:`os.replace`
    (atomic on one file system); on any exception it is deleted and ``path`` is left untouched.
    Missing parent directories are created.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
    """
    target = Path(path)
    _refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unused_temp_path(target.parent, _temp_suffix(target))
    try:
        yield tmp
        if not tmp.exists():
            raise InputError(f"Writing '{target}' produced no file.")
        _refuse_existing(target, force)  # it may have appeared while we were writing
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _temp_suffix(target: Path) -> str:
    """The output's extension as written (compound ones such as ``.seg.nrrd`` kept whole)."""
    name = target.name
    for ext in _READ_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[-len(ext):]
    return target.suffix


def _refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise OutputExistsError(f"Output '{target}' already exists; pass --force (force=True) to overwrite it.")
    if target.is_dir():
        raise OutputExistsError(f"Output '{target}' is a directory; give a file name.")


def _unused_temp_path(directory: Path, ext: str) -> Path:
    # Not created here (unlike mkstemp), so the writer creates it with the user's normal permissions.
    while True:
        candidate = directory / f".tmp-{secrets.token_hex(4)}{ext}"
        if not candidate.exists():
            return candidate


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a scalar image (FLAIR, T1, probability map, ...) as float32 in array order, with its geometry.

    Formats: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd (via SimpleITK). Intensities are returned as
    stored (no rescaling beyond the file's own scale/slope).

    Raises:
        InputError: missing or unreadable file, multi-component image, or NaN/inf voxels.
    """
    image = _read_sitk(path)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(
            f"Image '{path}' has {int(bad.sum())} NaN or infinite voxels (of {array.size}); "
            "fix or mask them (e.g. set them to 0) before using the image."
        )
    return array, Geometry.from_sitk(image)


def read_labelmap(path: str | os.PathLike, schema: ClassSchema = DEFAULT_SCHEMA,
                  class_map: Mapping[Any, Any] | None = None) -> LabelVolume:
    """Read a labelmap or 3D Slicer segmentation as class indices of ``schema``.

    * Labelmap images (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd): voxel value ``v`` is class ``v``.
      Float-stored masks are rounded when every value is within 1e-3 of an integer (else refused).
      ``class_map`` maps stored values to classes, e.g. ``{1: "tumour", 2: "tumour", 4: "tumour"}``;
      with a map, every stored value must be mapped, except 0, which defaults to the background class.
    * Segmentations (.seg.nrrd, or any NRRD whose header has ``SegmentN_`` fields): each segment is
      mapped to a class by its name (case-insensitive, schema synonyms such as "Tumor", "Cortex",
      "Ventricles"); ``class_map`` (segment name -> class) overrides names. Overlapping segments
      (several layers) are allowed only when they map to the same class. Unsegmented voxels are
      background.

    Args:
        path: the file.
        schema: the classes to map to.
        class_map: optional {stored value or segment name: class name or index}.

    Returns:
        A :class:`LabelVolume` with uint8 labels (int16 for schemas over 256 classes).

    Raises:
        InputError: missing/unreadable file, values or segments that match no class, overlapping
            segments of different classes, non-integer float labels.
    """
    p = _existing_file(path)
    ext = file_extension(p)
    if ext in (".seg.nrrd", ".nrrd", ".nhdr") and _has_segment_fields(p):
        return _read_segmentation_nrrd(p, schema, class_map)
    image = _read_sitk(p)
    values = _integer_labels(sitk.GetArrayFromImage(image), p)
    labels = _map_label_values(values, schema, class_map, p)
    return LabelVolume(labels, Geometry.from_sitk(image), schema, str(p))


def _read_sitk(path: str | os.PathLike) -> sitk.Image:
    p = _existing_file(path)
    file_extension(p)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"Cannot read '{p}': {_sitk_reason(exc)}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{p}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or vector image); "
            "give a single-component (scalar) volume."
        )
    if image.GetDimension() not in (2, 3):
        raise InputError(f"'{p}' is {image.GetDimension()}D; only 2D and 3D volumes are supported.")
    if file_extension(p).startswith(".nii") and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        _refuse_nifti_nonfinite(p)
    return image


def _refuse_nifti_nonfinite(path: Path) -> None:
    """Look for NaN/inf in a float NIfTI file's raw voxels.

    ITK 5's NIfTI reader (used by SimpleITK 2.x) silently replaces NaN and +-inf by 0, which would
    turn e.g. out-of-mask NaNs into plausible intensities or background labels, so we check the
    stored values ourselves.
    """
    bad = _nifti_nonfinite_voxel_count(path)
    if bad:
        raise InputError(
            f"'{path}' has {bad} NaN or infinite voxels; fix or mask them (e.g. set them to 0) before using it."
        )


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}  # NIfTI datatype code -> numpy type


def _nifti_nonfinite_voxel_count(path: Path) -> int:
    """Number of non-finite stored values in a NIfTI-1/2 float file (0 for other types)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        endian = next((e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
        if endian is None:
            return 0  # not a header we know; SimpleITK already accepted the file
        if struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        else:  # NIfTI-2
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
        if datatype not in _NIFTI_FLOAT_TYPES:
            return 0
        count = int(np.prod([max(int(d), 1) for d in dims[1:1 + min(max(int(dims[0]), 1), 7)]]))
        dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
        f.seek(offset)
        raw = f.read(count * dtype.itemsize)
    data = np.frombuffer(raw[:len(raw) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    return int(np.count_nonzero(~np.isfinite(data)))


def _sitk_reason(exc: Exception) -> str:
    """The informative last line of a SimpleITK exception (they start with C++ source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason.replace("sitk::ERROR:", "").strip()


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label values; float masks are rounded if (and only if) they hold near-integers."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array
    if not np.isfinite(array).all():
        raise InputError(f"Labelmap '{path}' contains NaN or infinite values; a labelmap must hold class numbers.")
    rounded = np.rint(array)
    off = np.abs(array - rounded) > _FLOAT_LABEL_TOLERANCE
    if off.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(array[off])[:5])
        raise InputError(
            f"Labelmap '{path}' stores non-integer labels ({int(off.sum())} voxels, e.g. {examples}). "
            "It was probably resampled with linear interpolation; resample labelmaps with nearest-neighbour."
        )
    return rounded.astype(np.int64)


def label_dtype(num_values: int) -> np.dtype:
    """The smallest dtype AnatomyDT stores labels in: uint8 for up to 256 values, else int16."""
    return np.dtype(np.uint8) if num_values <= 256 else np.dtype(np.int16)


def _describe_counts(values: np.ndarray, counts: np.ndarray, limit: int = 10) -> str:
    items = [f"{int(v)} ({int(c)} voxels)" for v, c in zip(values[:limit], counts[:limit])]
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(items) + more


def _map_label_values(values: np.ndarray, schema: ClassSchema, class_map: Mapping[Any, Any] | None,
                      path: Path) -> np.ndarray:
    """Stored label values -> class indices, directly or through ``class_map``."""
    dtype = label_dtype(schema.num_classes)
    if class_map is None:
        _refuse_values_outside_schema(values, schema, path)
        return values.astype(dtype)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    value_to_class = _label_value_class_map(class_map, schema)
    value_to_class.setdefault(0, schema.background_index)
    unmapped = np.array([v not in value_to_class for v in unique.tolist()], dtype=bool)
    if unmapped.any():
        raise InputError(
            f"Labelmap '{path}' has label values missing from the class map {_format_map(class_map)}: "
            f"{_describe_counts(unique[unmapped], counts[unmapped])}. "
            f"Add them to the class map (--classes, e.g. --classes {int(unique[unmapped][0])}=background)."
        )
    lookup = np.array([value_to_class[v] for v in unique.tolist()], dtype=dtype)
    return lookup[inverse.reshape(values.shape)]


def _refuse_values_outside_schema(values: np.ndarray, schema: ClassSchema, path: Path) -> None:
    if values.size == 0 or (values.min() >= 0 and values.max() < schema.num_classes):
        return
    unique, counts = np.unique(values, return_counts=True)
    outside = (unique < 0) | (unique >= schema.num_classes)
    raise InputError(
        f"Labelmap '{path}' has label values outside the {schema.num_classes} classes "
        f"0..{schema.num_classes - 1} ({', '.join(f'{k}={n}' for k, n in enumerate(schema.names))}): "
        f"{_describe_counts(unique[outside], counts[outside])}. "
        f"Pass a class map (--classes, e.g. --classes {int(unique[outside][0])}=tumour) saying which class each value is."
    )


def _label_value_class_map(class_map: Mapping[Any, Any], schema: ClassSchema) -> dict[int, int]:
    resolved = {}
    for key, cls in class_map.items():
        try:
            value = int(str(key).strip()) if not isinstance(key, (int, np.integer)) else int(key)
        except ValueError as exc:
            raise InputError(
                f"Class map key {key!r} is not a label value; for a labelmap file the class map maps integer "
                "label values to classes, e.g. {1: 'tumour', 2: 'tumour'}."
            ) from exc
        resolved[value] = _resolve_class(cls, schema, f"class map entry {key!r}")
    return resolved


def _resolve_class(cls: Any, schema: ClassSchema, context: str) -> int:
    """Class index of a class name/index (digit strings count as indices)."""
    if isinstance(cls, np.integer):
        cls = int(cls)
    if isinstance(cls, str) and cls.strip().isdigit():
        cls = int(cls.strip())
    try:
        return schema.index(cls)
    except InputError as exc:
        raise InputError(f"In the {context}: {exc}") from exc


def _format_map(class_map: Mapping[Any, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in class_map.items()) + "}"


def _has_segment_fields(path: Path) -> bool:
    """Whether a NRRD header describes 3D Slicer segments (``Segment0_Name:=...``).

    A header pynrrd cannot parse is left to SimpleITK, which reads more NRRD variants and
    reports its own reason if it cannot.
    """
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # pynrrd raises NRRDError, OSError, UnicodeDecodeError...
        return False
    return any(_SEGMENT_FIELD.match(key) for key in header)


def _read_segmentation_nrrd(path: Path, schema: ClassSchema, class_map: Mapping[Any, Any] | None) -> LabelVolume:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises OSError, ValueError, NRRDError...
        raise InputError(f"Cannot read segmentation '{path}': {exc}") from exc
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim not in (3, 4):
        raise InputError(f"Segmentation '{path}' has a {voxels.ndim}D voxel array; expected 3D (or 4D with layers).")
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels  # (layer, i, j, k)
    segments = seg.get("segments", [])
    segment_classes = _segment_classes(segments, schema, class_map, path)
    labels_ijk = _rasterise_segments(layers, segments, segment_classes, schema, path)
    labels = np.ascontiguousarray(labels_ijk.transpose(2, 1, 0))  # slicerio (i,j,k) -> SimpleITK (k,j,i)
    geometry = Geometry.from_ijk_to_lps(seg["ijkToLPS"])
    if str(seg.get(_SPATIAL_DIMENSIONS_KEY, "")).strip() == "2" and labels.shape[0] == 1:
        labels, geometry = labels[0], geometry.as_2d()
    return LabelVolume(labels, geometry, schema, str(path))


def _segment_classes(segments: list[dict], schema: ClassSchema, class_map: Mapping[Any, Any] | None,
                     path: Path) -> list[int]:
    """Class index of each segment: the class map entry for its name or ID if any, else its name."""
    overrides = {str(k).strip().lower(): v for k, v in (class_map or {}).items()}
    classes = []
    for segment in segments:
        name = str(segment.get("name", segment.get("id", "")))
        key = next((k for k in (name.strip().lower(), str(segment.get("id", "")).strip().lower()) if k in overrides), None)
        if key is not None:
            classes.append(_resolve_class(overrides[key], schema, f"class map entry for segment {name!r}"))
            continue
        try:
            classes.append(schema.index(name))
        except InputError:
            raise InputError(
                f"Segment {name!r} in '{path}' matches no class; the classes are {list(schema.names)}. "
                f"Rename the segment in 3D Slicer or pass a class map (--classes, e.g. --classes \"{name}=tumour\")."
            ) from None
    return classes


def _rasterise_segments(layers: np.ndarray, segments: list[dict], segment_classes: list[int], schema: ClassSchema,
                        path: Path) -> np.ndarray:
    """One class index per voxel (i, j, k) from possibly overlapping segments."""
    spatial = layers.shape[1:]
    labels = np.full(spatial, schema.background_index, dtype=label_dtype(schema.num_classes))
    owner = np.full(spatial, -1, dtype=np.int32)  # index of the segment that set each voxel
    for n, (segment, cls) in enumerate(zip(segments, segment_classes)):
        layer = int(segment.get("layer", 0))
        if not 0 <= layer < layers.shape[0]:
            raise InputError(f"Segment {segment.get('name')!r} in '{path}' refers to layer {layer}, "
                             f"but the file has {layers.shape[0]} layer(s).")
        mask = layers[layer] == int(segment.get("labelValue", 1))
        _refuse_conflicting_overlap(mask, owner, n, segments, segment_classes, path)
        labels[mask] = cls
        owner[mask] = n
    return labels


def _refuse_conflicting_overlap(mask: np.ndarray, owner: np.ndarray, n: int, segments: list[dict],
                                segment_classes: list[int], path: Path) -> None:
    overlap_owners = owner[mask]
    overlap_owners = overlap_owners[overlap_owners >= 0]
    if overlap_owners.size == 0:
        return
    others, counts = np.unique(overlap_owners, return_counts=True)
    for other, count in zip(others.tolist(), counts.tolist()):
        if segment_classes[other] != segment_classes[n]:
            raise InputError(
                f"Segments {segments[other].get('name')!r} and {segments[n].get('name')!r} in '{path}' overlap in "
                f"{count} voxels but belong to different classes; each voxel needs one class. Remove the overlap "
                "in 3D Slicer (Segment Editor, masking 'overwrite other segments') or map both to the same class."
            )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_labelmap(path: str | os.PathLike, labels: Any, geometry: Geometry, schema: ClassSchema = DEFAULT_SCHEMA,
                   *, force: bool = False, extra_segment_tags: Mapping[str, str] | None = None) -> Path:
    """Write class labels (array order) with their exact geometry, atomically.

    * .nii.gz, .nii, .nrrd, .mha: a labelmap image (uint8; int16 above 256 classes) via SimpleITK.
      NIfTI stores geometry in float32, so it round-trips to ~1e-6 mm; the others exactly.
    * .seg.nrrd: a 3D Slicer segmentation with one segment per class present except background
      (ID and name = class name, colour = schema colour, labelValue = class index, layer 0), plus
      ``extra_segment_tags`` on every segment (other formats have no segments, so they ignore the
      tags). 2D labels become a one-slice 3D segmentation that :func:`read_labelmap` reads back as 2D.

    Returns the written path. Raises :class:`OutputExistsError` if it exists and not ``force``.
    """
    array = _labels_array(labels, geometry, schema)
    ext = file_extension(path, _WRITE_EXTENSIONS)
    tags = _checked_segment_tags(extra_segment_tags)
    with atomic_output(path, force) as tmp:
        if ext == ".seg.nrrd":
            _write_segmentation_nrrd(tmp, array, geometry, schema, tags)
        else:
            _write_sitk(tmp, array.astype(label_dtype(schema.num_classes), copy=False), geometry)
    return Path(path)


def write_image(path: str | os.PathLike, array: Any, geometry: Geometry, *, force: bool = False) -> Path:
    """Write a scalar float volume (e.g. one class's probability map) as float32, atomically.

    Formats: .nii.gz, .nii, .nrrd, .mha. ``array`` is in array order and must match ``geometry``'s
    dimension; NaN/inf are refused. Returns the written path.
    """
    data = np.asarray(_to_numpy(array), dtype=np.float32)
    if data.ndim != geometry.ndim:
        raise InputError(f"Image array is {data.ndim}D (shape {data.shape}) but the geometry is {geometry.ndim}D; "
                         "write one scalar volume per file.")
    if not np.isfinite(data).all():
        raise InputError(f"Refusing to write '{path}': the array has {int((~np.isfinite(data)).sum())} NaN/inf voxels.")
    ext = file_extension(path, _WRITE_EXTENSIONS)
    if ext == ".seg.nrrd":
        raise InputError(f"'{path}': a .seg.nrrd file holds segments, not float images; use .nrrd or .nii.gz.")
    with atomic_output(path, force) as tmp:
        _write_sitk(tmp, data, geometry)
    return Path(path)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_array(labels: Any, geometry: Geometry, schema: ClassSchema) -> np.ndarray:
    array = _to_numpy(labels)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"Labels to write must be integers, got dtype {array.dtype}; take the argmax of a field first.")
    if array.ndim != geometry.ndim:
        raise InputError(f"Labels are {array.ndim}D (shape {array.shape}) but the geometry is {geometry.ndim}D.")
    if array.size and (array.min() < 0 or array.max() >= schema.num_classes):
        unique, counts = np.unique(array, return_counts=True)
        outside = (unique < 0) | (unique >= schema.num_classes)
        raise InputError(f"Labels outside the classes 0..{schema.num_classes - 1}: {_describe_counts(unique[outside], counts[outside])}.")
    return array


def _write_sitk(tmp: Path, array: np.ndarray, geometry: Geometry) -> None:
    image = geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    try:
        sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as exc:
        raise InputError(f"Cannot write '{tmp.parent}': {_sitk_reason(exc)}") from exc


def _checked_segment_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """Validate tags so they survive the ``key:value|key:value|`` encoding of .seg.nrrd headers."""
    checked = {}
    for key, value in (tags or {}).items():
        key, value = str(key), str(value)
        if not key or any(c in key for c in ":|\n\r") or any(c in value for c in "|\n\r"):
            raise InputError(f"Segment tag {key!r}: {value!r} is invalid; keys must be non-empty without ':' or '|', "
                             "values without '|', and neither may contain line breaks.")
        if key in _RESERVED_SEGMENT_TAGS:
            raise InputError(f"Segment tag {key!r} is reserved by 3D Slicer; choose another key.")
        checked[key] = value
    return checked


def _segment_label_value(schema: ClassSchema, k: int) -> int:
    """Voxel value of class ``k`` in a .seg.nrrd: its index, shifted by one if class 0 is not the
    background (0 must mean "no segment" for 3D Slicer)."""
    return k if schema.background_index == 0 else k + 1


def _write_segmentation_nrrd(tmp: Path, labels: np.ndarray, geometry: Geometry, schema: ClassSchema,
                             tags: dict[str, str]) -> None:
    import slicerio

    labels3 = labels[np.newaxis] if labels.ndim == 2 else labels
    background = schema.background_index
    lookup = np.array([0 if k == background else _segment_label_value(schema, k) for k in range(schema.num_classes)])
    voxels = lookup.astype(label_dtype(int(lookup.max()) + 1))[labels3.transpose(2, 1, 0)]  # (k,j,i) -> (i,j,k)
    segments = []
    for k in np.unique(labels3).tolist():
        if k == background:
            continue
        segments.append({
            "id": schema.names[k],
            "name": schema.names[k],
            "nameAutoGenerated": False,
            "color": [float(c) for c in schema.colors[k]],
            "colorAutoGenerated": False,
            "labelValue": int(lookup[k]),
            "layer": 0,
            "tags": dict(tags),
        })
        entry = schema.terminology.get(schema.names[k])
        if entry:
            from slicerio.segmentation import terminology_entry_from_string

            segments[-1]["terminology"] = terminology_entry_from_string(entry)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": geometry.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "encoding": "gzip",
    }
    if labels.ndim == 2:
        segmentation[_SPATIAL_DIMENSIONS_KEY] = "2"
    slicerio.write_segmentation(str(tmp), segmentation, compression_level=_SEG_NRRD_GZIP_LEVEL)


def read_image_on_grid(path: str | os.PathLike, geometry: Geometry, shape: tuple[int, ...], *,
                       interpolation: str = "linear", default_value: float = 0.0) -> np.ndarray:
    """Read an image and resample it in physical (LPS) space onto a reference grid.

    Used for plan inputs drawn on another grid than the segmentation: resection masks
    (``interpolation="nearest"``) and radiotherapy dose maps (``"linear"``, Gy). Points of the
    reference grid outside the image get ``default_value``. The file is only read.

    Returns:
        float64 array of ``shape`` in array order.
    """
    image = _read_sitk(path)
    if image.GetDimension() != geometry.ndim:
        raise InputError(f"{str(path)!r} is {image.GetDimension()}D but the anatomy grid is {geometry.ndim}D.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{str(path)!r} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "give a single-channel image.")
    reference = geometry.apply_to_sitk(sitk.Image([int(n) for n in reversed(shape)], sitk.sitkUInt8))
    modes = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat64), reference, sitk.Transform(), modes[interpolation],
                              float(default_value), sitk.sitkFloat64)
    array = sitk.GetArrayFromImage(resampled)
    if not np.isfinite(array).all():
        raise InputError(f"{str(path)!r} contains NaN or infinite values.")
    return array
