"""Qt-free 3D Slicer scene logic: segmentation + FLAIR nodes in, predicted segmentation nodes out.

This is everything the AnatomyDT Slicer module does, written against MRML only (``slicer`` and
``vtk``), so it runs unchanged inside the Slicer application and in plain Python with the
``slicer-core`` wheel (which is how ``Testing/test_scene.py`` and ``Testing/test_scene_calibration.py``
run it on a real ``vtkMRMLScene``). The Qt widget only collects parameters and calls
:func:`predict_into_scene`, :func:`calibrate_into_scene` (calibration on earlier scans, then a
forecast from the last one) and :func:`probability_map_into_scene` (growth-probability map).

Nothing else in :mod:`AnatomyDTLib` imports this module, so the library itself still imports
without Slicer. torch is imported only when a prediction runs, so the segment-to-class helpers
work before PyTorch is installed.

Main entry point::

    nodes = predict_into_scene(scene, segmentation_node, flair_node, days=[30, 90], plan=stupp_plan(28),
                               model="pde-only", progress=print, cancel=lambda: False)
    nodes["segmentations"]       # one vtkMRMLSegmentationNode per day, named "<input> +30 d", ...

Conventions:

* Geometry: MRML volumes hold an IJK-to-RAS matrix; the library works in LPS
  (:class:`~AnatomyDTLib.io.Geometry`). ``LPS = diag(-1, -1, 1) RAS``. MRML arrays are
  ``(k, j, i)``, the library's ``(z, y, x)`` array order, so no transposition is needed.
* Input nodes are never modified. Temporary nodes needed to read segments are removed again.
* A cancelled or failed run leaves the scene as it was: output nodes are created only after
  the prediction finished, and every node created by the run is removed if anything fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import Cancelled, InputError
from .io import Geometry, LabelVolume, atomic_output, file_extension, label_dtype, read_image_on_grid, write_labelmap
from .schema import DEFAULT_SCHEMA, ClassSchema

if not hasattr(slicer, "vtkMRMLScene"):  # e.g. the unrelated PyPI package named "slicer"
    raise ImportError("AnatomyDTLib.scene needs 3D Slicer's Python ('slicer' with MRML): run it inside 3D Slicer "
                      "or install the 'slicer-core' wheel (pip install slicer-core).")

__all__ = [
    "predict_into_scene",
    "calibrate_into_scene",
    "probability_map_into_scene",
    "history_from_sequence",
    "remove_outputs",
    "SegmentClass",
    "segment_classes",
    "read_baseline",
    "volume_geometry",
    "resection_mask_from_segment",
    "dose_array_from_volume",
    "missing_classes",
    "completion_available",
    "add_volume_from_array",
    "export_segmentation",
    "export_labelmap_nifti",
    "created_nodes",
    "panel_plan",
    "time_points",
    "STUPP_PRESET",
    "NO_TREATMENT_PRESET",
    "ATTRIBUTE_PREFIX",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]
CancelCallback = Callable[[], bool]

ATTRIBUTE_PREFIX = "AnatomyDT."
"""Prefix of the MRML node attributes written on every output node."""
_ATTR_SOURCE = ATTRIBUTE_PREFIX + "SourceSegmentationID"
_ATTR_REFERENCE = ATTRIBUTE_PREFIX + "ReferenceVolumeID"
_ATTR_RUN = ATTRIBUTE_PREFIX + "RunID"
_ATTR_ROLE = ATTRIBUTE_PREFIX + "Role"
_ATTR_DAY = ATTRIBUTE_PREFIX + "Day"
_ATTR_MODEL = ATTRIBUTE_PREFIX + "Model"
_ATTR_PLAN = ATTRIBUTE_PREFIX + "PlanSummary"
_ATTR_NOTES = ATTRIBUTE_PREFIX + "PlanNotes"
_ATTR_KIND = ATTRIBUTE_PREFIX + "RunKind"  # "prediction", "calibration" or "probability_map"
_ATTR_HISTORY = ATTRIBUTE_PREFIX + "HistoryIDs"
_ATTR_SUMMARY = ATTRIBUTE_PREFIX + "Summary"
_KIND_PREDICTION = "prediction"
_KIND_CALIBRATION = "calibration"
_KIND_PROBABILITY_MAP = "probability_map"

_LUT_SINGLETON_TAG = "AnatomyDT.TumourProbabilityLUT"
_LUT_NAME = "AnatomyDT tumour probability"
_PROBABILITY_DISPLAY_THRESHOLD = 0.05  # below this tumour probability the overlay is transparent
_OVERLAY_OPACITY = 0.5
_IGNORE = "ignore"  # class-map value that leaves a segment out

# Fractions of the progress bar: reading inputs, the model run, building nodes (the days' nodes
# up to _PROGRESS_DAYS_END, then the sequences and the table). A calibration's fit takes most of
# its run. A prediction's forecast does not: on a 1 mm brain with three output days it took 1.8 s
# of an Apply of 3.5 s, and of 10.8 s when each day's closed surfaces are built (Slicer's surface
# smoothing, 2.2 s a day; benchmarks/perf_scene.py), so its bar ends the forecast earlier.
_PROGRESS_READ = 0.05
_PROGRESS_PREDICT_END = 0.85
_PROGRESS_FORECAST_END = 0.5
_PROGRESS_FORECAST_END_WITH_SURFACES = 0.2
_PROGRESS_DAYS_END = 0.95
_SURFACES_SHARE_OF_A_DAY = 0.8  # of the time a day's nodes take, when its closed surfaces are built

# Extra names, beyond the schema synonyms, that identify tumour sub-regions. Checked on segment
# names and on terminology code meanings (BraTS-style segmentations have one segment per
# sub-region; the brain schema merges them into one tumour class).
_EXTRA_CLASS_HINTS = {
    "tumour": ("neoplasm", "mass", "tumour", "tumor", "brain tumor", "brain tumour", "glioblastoma", "gbm",
               "edema", "oedema", "peritumoral edema", "peritumoural oedema", "necrosis", "necrotic core",
               "enhancing tumor", "enhancing tumour", "non enhancing tumor", "non enhancing tumour",
               "nonenhancing tumor", "nonenhancing tumour", "snfh", "tumor core", "tumour core"),
}


# --------------------------------------------------------------------------------------------
# Small MRML helpers
# --------------------------------------------------------------------------------------------


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node is not None else "(none)"


def _check_progress_and_cancel(progress: ProgressCallback | None, cancel: CancelCallback | None,
                               fraction: float) -> None:
    if cancel is not None and cancel():
        raise Cancelled("prediction cancelled by the user")
    if progress is not None:
        progress(float(min(1.0, max(0.0, fraction))))


def _ensure_segmentation_converters() -> None:
    """Register Slicer's segmentation conversion rules if nobody did (plain Python with slicer-core).

    The Slicer application registers them at start-up; without them an empty segment cannot be
    created and closed surfaces cannot be made.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                 "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                 "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if name not in registered and hasattr(slicer, name):
            factory.RegisterConverterRule(getattr(slicer, name)())


def _sequences_logic(scene):
    """The Sequences module logic: the application's when there is one, else a fresh one on ``scene``.

    Returns ``(logic, owned)``; an owned logic must be detached with ``SetMRMLScene(None)`` after use.
    """
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "sequences"):
        logic = modules.sequences.logic()
        if logic is not None and logic.GetMRMLScene() is scene:
            return logic, False
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)  # also registers the sequence browser node class
    return logic, True


def _subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _study_item_of(scene, node) -> int:
    """The subject-hierarchy item holding ``node`` (the FLAIR's study), or the scene item."""
    sh = _subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if item:
        parent = sh.GetItemParent(item)
        if parent:
            return parent
    return sh.GetSceneItemID()


def _place_in_hierarchy(scene, node, parent_item: int) -> None:
    """Put ``node`` under ``parent_item``; creates its item where the application did not."""
    sh = _subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent_item)
    else:
        sh.CreateItem(parent_item, node)


def created_nodes(result: Mapping[str, Any]) -> list:
    """All MRML nodes of a :func:`predict_into_scene` result, flattened (lists expanded, order kept)."""
    nodes = []
    for value in result.values():
        for node in (value if isinstance(value, (list, tuple)) else [value]):
            if node is not None and hasattr(node, "GetID"):
                nodes.append(node)
    return nodes


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def volume_geometry(volume_node) -> tuple[Geometry, tuple[int, int, int]]:
    """The LPS :class:`Geometry` and array shape ``(k, j, i)`` of a volume node's voxel grid.

    Raises:
        InputError: no node, no voxels, or a single-slice (2D) volume.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLVolumeNode"):
        raise InputError("Select a reference volume (the FLAIR the segmentation was drawn on).")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"The reference volume {_node_label(volume_node)} has no voxels; load the FLAIR image again.")
    dims = image.GetDimensions()  # (i, j, k)
    if min(dims) < 2:
        raise InputError(
            f"The reference volume {_node_label(volume_node)} is 2D (a single slice, {dims[0]}x{dims[1]}x{dims[2]} "
            "voxels). AnatomyDT predicts 3D anatomy: select the 3D FLAIR volume.")
    geometry = Geometry.from_ijk_to_lps(_RAS_FROM_LPS @ _ijk_to_ras(volume_node))
    return geometry, (int(dims[2]), int(dims[1]), int(dims[0]))


def _set_geometry(volume_node, geometry: Geometry) -> None:
    volume_node.SetIJKToRASMatrix(_numpy_to_matrix(_RAS_FROM_LPS @ geometry.ijk_to_lps()))


def _same_lattice(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4, atol_mm: float = 1e-3) -> bool:
    """Whether two IJK-to-world affines put voxel centres on the same lattice (origins may differ by
    whole voxels, so a cropped or padded grid of the same scan counts as the same grid)."""
    if not np.allclose(a[:3, :3], b[:3, :3], rtol=rtol, atol=rtol * float(np.abs(a[:3, :3]).max())):
        return False
    shift_vox = np.linalg.solve(a[:3, :3], b[:3, 3] - a[:3, 3])
    residual_mm = a[:3, :3] @ (shift_vox - np.round(shift_vox))
    return bool(np.all(np.abs(residual_mm) <= atol_mm))


def _check_segmentation_grid(segmentation_node, reference_volume_node) -> None:
    """Refuse a reference volume whose grid disagrees with the segmentation's own reference geometry,
    and a segmentation that lies entirely outside the reference volume."""
    segmentation = segmentation_node.GetSegmentation()
    serialized = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if serialized:
        seg_grid = slicer.vtkOrientedImageData()
        if slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, seg_grid, False):
            matrix = vtk.vtkMatrix4x4()
            seg_grid.GetImageToWorldMatrix(matrix)
            if not _same_lattice(_matrix_to_numpy(matrix), _ijk_to_ras(reference_volume_node)):
                seg_geometry = Geometry.from_ijk_to_lps(_RAS_FROM_LPS @ _matrix_to_numpy(matrix))
                ref_geometry, ref_shape = volume_geometry(reference_volume_node)
                raise InputError(
                    f"The reference volume {_node_label(reference_volume_node)} is on a different grid than the "
                    f"segmentation {_node_label(segmentation_node)} was drawn on:\n"
                    f"  segmentation: {seg_geometry.describe()}\n"
                    f"  reference:    {ref_geometry.describe(ref_shape)}\n"
                    "Select the volume the segmentation was made on, or resample the segmentation onto this volume "
                    "(Segmentations module: 'Specify geometry' / Resample Scalar/Vector/DWI Volume).")
    seg_bounds = [0.0] * 6
    segmentation.GetBounds(seg_bounds)
    ref_bounds = [0.0] * 6
    reference_volume_node.GetRASBounds(ref_bounds)
    if seg_bounds[0] > seg_bounds[1]:  # no segment has any voxel
        return
    overlaps = all(seg_bounds[2 * a] <= ref_bounds[2 * a + 1] and ref_bounds[2 * a] <= seg_bounds[2 * a + 1]
                   for a in range(3))
    if not overlaps:
        raise InputError(
            f"The segmentation {_node_label(segmentation_node)} lies entirely outside the reference volume "
            f"{_node_label(reference_volume_node)}; select the FLAIR of the same patient and session.")


def _refuse_transformed(*nodes) -> None:
    for node in nodes:
        if node is not None and node.GetParentTransformNode() is not None:
            raise InputError(
                f"{_node_label(node)} is under the transform {_node_label(node.GetParentTransformNode())}. "
                "Harden the transform first (Data module: right-click the node, 'Harden transform').")


# --------------------------------------------------------------------------------------------
# Segments -> classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentClass:
    """How one input segment maps to a class.

    Attributes:
        segment_id, name: the segment.
        class_name: the class it belongs to, or ``None`` if unknown (or ignored).
        source: why: ``"class map"``, ``"name"``, ``"terminology"``, ``"ignored"`` or ``"unmatched"``.
        terminology: the segment's terminology entry string (may be Slicer's default "Tissue").
    """

    segment_id: str
    name: str
    class_name: str | None
    source: str
    terminology: str = ""


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(text).strip().lower())


def _class_from_text(text: str, schema: ClassSchema) -> str | None:
    key = _normalise(text)
    if not key:
        return None
    for candidate in (key, key.replace(" ", "_"), str(text).strip().lower()):
        try:
            return schema.names[schema.index(candidate)]
        except InputError:
            pass
    for class_name, hints in _EXTRA_CLASS_HINTS.items():
        if class_name in schema.names and key in hints:
            return class_name
    return None


def _terminology_meanings(terminology: str) -> list[str]:
    """Code meanings of a Slicer terminology entry string, most specific first.

    The string is ``context~category~type~typeModifier~anatomicContext~region~regionModifier`` with
    each code as ``scheme^value^meaning``; we use the type (with its modifier) and the region.
    """
    fields = str(terminology or "").split("~")
    if len(fields) < 3:
        return []

    def meaning(i: int) -> str:
        parts = fields[i].split("^") if i < len(fields) else []
        return parts[2].strip() if len(parts) >= 3 else ""

    type_meaning, modifier, region, region_modifier = meaning(2), meaning(3), meaning(5), meaning(6)
    out = []
    if modifier and type_meaning:
        out.append(f"{modifier} {type_meaning}")
    out.append(type_meaning)
    if region_modifier and region:
        out.append(f"{region_modifier} {region}")
    out.append(region)
    return [m for m in out if m]


def _resolve_class_map(class_map: Mapping[Any, Any] | None, schema: ClassSchema) -> dict[str, str | None]:
    resolved: dict[str, str | None] = {}
    for key, value in (class_map or {}).items():
        if value is None or (isinstance(value, str) and value.strip().lower() in (_IGNORE, "(ignore)", "")):
            resolved[str(key).strip().lower()] = None
            continue
        try:
            resolved[str(key).strip().lower()] = schema.names[schema.index(value)]
        except InputError:
            raise InputError(f"Class map entry {key!r}: {value!r} is not a class; use one of {list(schema.names)} "
                             f"or '{_IGNORE}'.") from None
    return resolved


def segment_classes(segmentation_node, class_map: Mapping[Any, Any] | None = None,
                    schema: ClassSchema = DEFAULT_SCHEMA) -> list[SegmentClass]:
    """Map every segment of a segmentation node to a class (this fills the module's class table).

    Order of precedence: ``class_map`` (segment name or ID, case-insensitive -> class name, index,
    or ``None``/``"ignore"`` to leave the segment out), then the segment name (schema names and
    synonyms such as "Tumor", "WM", "Cortex", "Ventricles", plus tumour sub-regions such as
    "Edema" or "Necrosis"), then the code meanings of its terminology (e.g. type "Neoplasm").
    Segments that match nothing get ``class_name=None, source="unmatched"``.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("Select a segmentation node with the baseline segments (tumour, white matter, ...).")
    overrides = _resolve_class_map(class_map, schema)
    segmentation = segmentation_node.GetSegmentation()
    result = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName() or segment_id
        terminology = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
        key = next((k for k in (name.strip().lower(), segment_id.strip().lower()) if k in overrides), None)
        if key is not None:
            cls = overrides[key]
            result.append(SegmentClass(segment_id, name, cls, "class map" if cls else "ignored", terminology))
            continue
        cls = _class_from_text(name, schema)
        if cls is not None:
            result.append(SegmentClass(segment_id, name, cls, "name", terminology))
            continue
        cls = next((c for c in (_class_from_text(m, schema) for m in _terminology_meanings(terminology)) if c), None)
        result.append(SegmentClass(segment_id, name, cls, "terminology" if cls else "unmatched", terminology))
    return result


def missing_classes(labels: LabelVolume | np.ndarray, schema: ClassSchema = DEFAULT_SCHEMA) -> list[str]:
    """Non-background classes with no voxel in ``labels`` (e.g. to offer anatomy completion)."""
    array = labels.labels if isinstance(labels, LabelVolume) else np.asarray(labels)
    present = set(np.unique(array).tolist())
    return [name for k, name in enumerate(schema.names) if k != schema.background_index and k not in present]


def completion_available() -> bool:
    """Whether ``AnatomyDTLib.brain.completion.complete_anatomy`` (atlas-based completion of missing
    white matter, grey matter and ventricles) is installed."""
    try:
        spec = importlib.util.find_spec(f"{__package__}.brain.completion")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    try:
        module = importlib.import_module(f"{__package__}.brain.completion")
    except Exception:  # noqa: BLE001 - a broken optional module must not break the panel
        logger.exception("AnatomyDTLib.brain.completion is present but cannot be imported")
        return False
    return callable(getattr(module, "complete_anatomy", None))


def _complete_anatomy(volume: LabelVolume, flair: np.ndarray, explicit_background: np.ndarray,
                      progress: Callable[[float], None] | None = None) -> LabelVolume:
    """Fill the missing classes with ``AnatomyDTLib.brain.completion.complete_anatomy``.

    The atlas anatomy registered to the FLAIR fills only classes the segmentation lacks, and only
    in voxels it left as background; every labelled voxel is kept. Segments the user mapped to
    background (e.g. a resection cavity) are passed as the cavity and stay background.
    """
    module = importlib.import_module(f"{__package__}.brain.completion")
    schema = volume.schema
    cavity = explicit_background if explicit_background.any() else None
    completed, _report = module.complete_anatomy(volume.labels, flair, volume.geometry, cavity_mask=cavity,
                                                 progress=progress)
    completed = np.asarray(completed)
    if completed.shape != volume.labels.shape:
        raise InputError(f"Anatomy completion returned shape {completed.shape}, expected {volume.labels.shape}.")
    missing = [schema.index(name) for name in missing_classes(volume, schema)]
    labels = volume.labels.copy()
    fill = (labels == schema.background_index) & np.isin(completed, missing) & ~explicit_background
    labels[fill] = completed[fill].astype(labels.dtype)
    return LabelVolume(labels, volume.geometry, schema, volume.source)


# --------------------------------------------------------------------------------------------
# Reading segments on the reference grid
# --------------------------------------------------------------------------------------------


class _TemporaryNodes:
    """Removes every node added to the scene inside the ``with`` block (e.g. the label node, display
    node and colour table that ExportSegmentsToLabelmapNode creates)."""

    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = _node_ids(self.scene)
        return self

    def __exit__(self, *exc):
        _remove_nodes(self.scene, [n for n in _nodes(self.scene) if n.GetID() not in self.before])
        return False


def _segment_masks(scene, segmentation_node, segment_ids: Sequence[str], reference_volume_node,
                   shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Boolean masks (array order) of segments resampled on the reference volume's grid."""
    masks = []
    with _TemporaryNodes(scene):
        label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AnatomyDT temporary labelmap")
        label_node.SetHideFromEditors(True)
        for segment_id in segment_ids:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, label_node, reference_volume_node)
            image = label_node.GetImageData()
            if not ok or image is None:
                raise InputError(f"Could not read segment {segment_id!r} of {_node_label(segmentation_node)} on the "
                                 f"grid of {_node_label(reference_volume_node)}.")
            dims = image.GetDimensions()
            array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
            if array.shape != shape:
                raise InputError(f"Segment {segment_id!r} came out with shape {array.shape} instead of the reference "
                                 f"volume's {shape}.")
            masks.append(array != 0)
    return masks


def read_baseline(segmentation_node, reference_volume_node, *, class_map: Mapping[Any, Any] | None = None,
                  schema: ClassSchema = DEFAULT_SCHEMA, scene=None) -> LabelVolume:
    """The baseline class labelmap of a segmentation on the reference volume's grid (LPS geometry).

    Every segment is exported on the reference grid (``ExportSegmentsToLabelmapNode``) and given
    its class by :func:`segment_classes`. Where segments of different classes overlap, the tumour
    wins; any other conflicting overlap is an error naming both segments. Nothing in the scene is
    changed.

    Raises:
        InputError: unmatched segments, no tumour segment, grid mismatch, segmentation outside the
            volume, 2D volume, transformed nodes, conflicting overlaps.
    """
    return _read_baseline(segmentation_node, reference_volume_node, class_map, schema, scene)[0]


def _read_baseline(segmentation_node, reference_volume_node, class_map, schema: ClassSchema,
                   scene=None) -> tuple[LabelVolume, np.ndarray]:
    """:func:`read_baseline`, plus the mask of segments explicitly mapped to the background class."""
    scene = scene or (segmentation_node.GetScene() if segmentation_node is not None else None)
    if scene is None:
        raise InputError("Select a segmentation node that is in the scene.")
    geometry, shape = volume_geometry(reference_volume_node)
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("Select a segmentation node with the baseline segments (tumour, white matter, ...).")
    _refuse_transformed(segmentation_node, reference_volume_node)
    mapping = segment_classes(segmentation_node, class_map, schema)
    if not mapping:
        raise InputError(f"The segmentation {_node_label(segmentation_node)} has no segments.")
    unmatched = [m.name for m in mapping if m.source == "unmatched"]
    if unmatched:
        raise InputError(
            f"Segment(s) {', '.join(repr(n) for n in unmatched)} match no class; the classes are "
            f"{list(schema.names)}. Rename them (e.g. 'Tumor', 'White matter', 'Cortex', 'Ventricles'), choose "
            f"their class in the class table, or set them to '{_IGNORE}'.")
    used = [m for m in mapping if m.class_name is not None]
    if not any(m.class_name == schema.tumour for m in used):
        raise InputError(
            f"The segmentation {_node_label(segmentation_node)} has no tumour segment (segments: "
            f"{', '.join(repr(m.name) for m in mapping)}). Name the tumour segment 'Tumor' or map it to "
            f"'{schema.tumour}' in the class table.")
    _check_segmentation_grid(segmentation_node, reference_volume_node)
    masks = _segment_masks(scene, segmentation_node, [m.segment_id for m in used], reference_volume_node, shape)
    labels = _rasterise(masks, used, schema, shape)
    if not any(mask.any() for mask in masks) and segmentation_node.GetSegmentation().GetNumberOfSegments():
        raise InputError(f"No segment of {_node_label(segmentation_node)} has a voxel inside the reference volume "
                         f"{_node_label(reference_volume_node)}; select the FLAIR the segmentation was drawn on.")
    explicit_background = np.zeros(shape, dtype=bool)
    for mask, segment in zip(masks, used):
        if segment.class_name == schema.background:
            explicit_background |= mask
    return LabelVolume(labels, geometry, schema, source=segmentation_node.GetName() or ""), explicit_background


def _rasterise(masks: list[np.ndarray], segments: list[SegmentClass], schema: ClassSchema,
               shape: tuple[int, ...]) -> np.ndarray:
    labels = np.full(shape, schema.background_index, dtype=label_dtype(schema.num_classes))
    owner = np.full(shape, -1, dtype=np.int32)
    tumour = schema.tumour_index
    order = [i for i, s in enumerate(segments) if s.class_name != schema.tumour] + \
            [i for i, s in enumerate(segments) if s.class_name == schema.tumour]
    for n in order:
        mask, segment = masks[n], segments[n]
        cls = schema.index(segment.class_name)
        if cls != tumour:
            previous = owner[mask]
            previous = previous[previous >= 0]
            for other in np.unique(previous).tolist():
                if schema.index(segments[other].class_name) != cls:
                    count = int((previous == other).sum())
                    raise InputError(
                        f"Segments {segments[other].name!r} ({segments[other].class_name}) and {segment.name!r} "
                        f"({segment.class_name}) overlap in {count} voxels; each voxel needs one class (only the "
                        "tumour may overlap other segments). Remove the overlap in the Segment Editor or map both "
                        "segments to the same class.")
        labels[mask] = cls
        owner[mask] = n
    return labels


# --------------------------------------------------------------------------------------------
# Treatment inputs from nodes
# --------------------------------------------------------------------------------------------


def resection_mask_from_segment(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """A resection mask (bool, array order, on the reference grid) drawn as a segment.

    Use it as ``{"surgery": [{"day": 5, "resection_mask": mask}]}`` in a plan dict.
    """
    if segmentation_node is None or not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError("Select the segment that outlines the resection (cavity) for the surgery.")
    _refuse_transformed(segmentation_node, reference_volume_node)
    _, shape = volume_geometry(reference_volume_node)
    mask = _segment_masks(segmentation_node.GetScene(), segmentation_node, [segment_id], reference_volume_node, shape)[0]
    if not mask.any():
        raise InputError(f"The resection segment {segment_id!r} has no voxel inside the reference volume.")
    return mask


def dose_array_from_volume(dose_volume_node, reference_volume_node) -> np.ndarray:
    """A radiotherapy dose volume (total dose in Gy, e.g. from SlicerRT) on the reference grid.

    Resampled linearly in physical space when its grid differs; points outside it get 0 Gy.
    Use it as the plan's ``radiotherapy.dose_map``.
    """
    if dose_volume_node is None or dose_volume_node.GetImageData() is None:
        raise InputError("Select the radiotherapy dose volume (total planned dose in Gy).")
    _refuse_transformed(dose_volume_node, reference_volume_node)
    ref_geometry, ref_shape = volume_geometry(reference_volume_node)
    dims = dose_volume_node.GetImageData().GetDimensions()
    scalars = dose_volume_node.GetImageData().GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        raise InputError(f"The dose volume {_node_label(dose_volume_node)} must have one value per voxel (Gy).")
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).astype(np.float64)
    dose_geometry = Geometry.from_ijk_to_lps(_RAS_FROM_LPS @ _ijk_to_ras(dose_volume_node))
    if array.shape == ref_shape and dose_geometry.matches(ref_geometry):
        return array.copy()
    import SimpleITK as sitk

    image = dose_geometry.apply_to_sitk(sitk.GetImageFromArray(array))
    reference = ref_geometry.apply_to_sitk(sitk.Image([int(n) for n in reversed(ref_shape)], sitk.sitkUInt8))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(resampled)


def _plan_file_loader(geometry: Geometry, shape: tuple[int, ...]):
    def load(path: str, kind: str) -> np.ndarray:
        interpolation = "nearest" if kind == "resection_mask" else "linear"
        array = read_image_on_grid(path, geometry, shape, interpolation=interpolation)
        return array > 0.5 if kind == "resection_mask" else array
    return load


# --------------------------------------------------------------------------------------------
# Panel values -> plan and time points (what the Slicer widget collects)
# --------------------------------------------------------------------------------------------

#: Panel values of the "No treatment" preset (see :func:`panel_plan`).
NO_TREATMENT_PRESET = {"surgery_enabled": False, "rt_enabled": False, "chemo_enabled": False}

#: Panel values of the "Stupp 60 Gy/30 fx + TMZ" preset: 30 x 2 Gy Monday-Friday from day 28,
#: concurrent daily temozolomide until the day after the last fraction (days 28-67), then 6 adjuvant
#: cycles of 5 days every 28 days from day 96. ``panel_plan(**STUPP_PRESET)`` equals
#: ``AnatomyDTLib.plan.stupp_plan(28)``.
STUPP_PRESET = {
    "surgery_enabled": False,
    "rt_enabled": True, "rt_start_day": 28.0, "rt_total_dose_gy": 60.0, "rt_fractions": 30, "rt_fractions_per_week": 5,
    "chemo_enabled": True, "chemo_kill_rate_per_day": 0.02,
    "chemo_concurrent_start_day": 28.0, "chemo_concurrent_days": 40.0,
    "chemo_adjuvant_start_day": 96.0, "chemo_adjuvant_cycles": 6, "chemo_days_on": 5.0, "chemo_cycle_length_days": 28.0,
}


def panel_plan(*, surgery_enabled: bool = False, surgery_day: float = 0.0, resection_mask: np.ndarray | None = None,
               surgery_extent: float | None = None,
               rt_enabled: bool = False, rt_start_day: float = 28.0, rt_total_dose_gy: float = 60.0,
               rt_fractions: int = 30, rt_fractions_per_week: int = 5, dose_map: np.ndarray | None = None,
               chemo_enabled: bool = False, chemo_agent: str = "temozolomide", chemo_kill_rate_per_day: float = 0.02,
               chemo_concurrent_start_day: float = 28.0, chemo_concurrent_days: float = 0.0,
               chemo_adjuvant_start_day: float = 96.0, chemo_adjuvant_cycles: int = 0, chemo_days_on: float = 5.0,
               chemo_cycle_length_days: float = 28.0) -> dict:
    """A plan dict (format of docs/plan.md, version 1) from the module's treatment panel.

    * surgery: on ``surgery_day``, either the ``resection_mask`` (bool array on the reference grid,
      :func:`resection_mask_from_segment`) or ``surgery_extent`` (fraction 0-1 of the tumour mass);
    * radiotherapy: ``rt_fractions`` fractions, ``rt_fractions_per_week`` per week from
      ``rt_start_day``, ``rt_total_dose_gy`` in total; ``dose_map`` (Gy, reference grid,
      :func:`dose_array_from_volume`) sets the per-voxel total dose;
    * chemotherapy: a concurrent daily window of ``chemo_concurrent_days`` days (0 = none) and
      ``chemo_adjuvant_cycles`` cycles (0 = none) of ``chemo_days_on`` days every
      ``chemo_cycle_length_days`` days, at ``chemo_kill_rate_per_day``.

    Validation happens in :func:`AnatomyDTLib.plan.load_plan` (PlanError lists every problem).
    """
    plan: dict = {"version": 1}
    if surgery_enabled:
        if resection_mask is not None:
            plan["surgery"] = [{"day": float(surgery_day), "resection_mask": np.asarray(resection_mask, bool)}]
        elif surgery_extent is not None:
            plan["surgery"] = [{"day": float(surgery_day), "extent": float(surgery_extent)}]
        else:
            raise InputError("Surgery is on: choose the resection segment or give the extent of resection.")
    if rt_enabled:
        rt = {"start_day": float(rt_start_day), "fractions": int(rt_fractions),
              "fractions_per_week": int(rt_fractions_per_week), "total_dose_gy": float(rt_total_dose_gy)}
        if dose_map is not None:
            rt["dose_map"] = np.asarray(dose_map, dtype=np.float64)
        plan["radiotherapy"] = rt
    if chemo_enabled:
        chemo = []
        if chemo_concurrent_days > 0:
            start = float(chemo_concurrent_start_day)
            chemo.append({"agent": chemo_agent, "kill_rate_per_day": float(chemo_kill_rate_per_day),
                          "windows": [[start, start + float(chemo_concurrent_days)]]})
        if chemo_adjuvant_cycles > 0:
            chemo.append({"agent": chemo_agent, "kill_rate_per_day": float(chemo_kill_rate_per_day),
                          "start_day": float(chemo_adjuvant_start_day), "cycles": int(chemo_adjuvant_cycles),
                          "days_on": float(chemo_days_on), "cycle_length_days": float(chemo_cycle_length_days)})
        if not chemo:
            raise InputError("Chemotherapy is on: give a concurrent duration or a number of adjuvant cycles.")
        plan["chemotherapy"] = chemo
    return plan


def time_points(horizon: float, unit: str = "days", intermediate: str | Sequence[float] = "") -> list[float]:
    """Output days from the panel: the horizon plus optional intermediate time points, in ``unit``
    (``"days"`` or ``"weeks"``). ``intermediate`` is text like ``"30, 60"`` (commas, semicolons or
    spaces) or a list. Returns sorted unique days > 0; points after the horizon are an error."""
    factor = {"days": 1.0, "day": 1.0, "d": 1.0, "weeks": 7.0, "week": 7.0, "w": 7.0}.get(str(unit).strip().lower())
    if factor is None:
        raise InputError(f"The horizon unit must be 'days' or 'weeks', got {unit!r}.")
    if isinstance(intermediate, str):
        tokens = [t for t in re.split(r"[,;\s]+", intermediate.strip()) if t]
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise InputError(f"Intermediate time points must be numbers separated by commas, got {intermediate!r}.") \
                from None
    else:
        values = [float(v) for v in intermediate]
    horizon = float(horizon)
    if not horizon > 0:
        raise InputError(f"The horizon must be > 0 {unit}, got {horizon:g}.")
    bad = [v for v in values if not 0 < v <= horizon]
    if bad:
        raise InputError(f"Intermediate time points must lie between 0 and the horizon ({horizon:g} {unit}); "
                         f"got {', '.join(f'{v:g}' for v in bad)}.")
    return sorted({round(v * factor, 9) for v in values + [horizon]})


# --------------------------------------------------------------------------------------------
# Building output nodes
# --------------------------------------------------------------------------------------------


def _image_data(array: np.ndarray, vtk_type: int) -> vtk.vtkImageData:
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                                               array_type=vtk_type))
    return image


def add_volume_from_array(scene, array: np.ndarray, geometry: Geometry, name: str, *,
                          node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a scalar (or labelmap) volume node holding ``array`` (array order ``(k, j, i)``) with an
    LPS ``geometry``; returns the node (with default display nodes)."""
    array = np.asarray(array)
    if array.ndim != 3 or geometry.ndim != 3:
        raise InputError(f"A volume node needs a 3D array and geometry, got shape {array.shape}.")
    node = scene.AddNewNodeByClass(node_class, name)
    _set_geometry(node, geometry)
    vtk_type = numpy_support.get_vtk_array_type(array.dtype)
    node.SetAndObserveImageData(_image_data(array, vtk_type))
    node.CreateDefaultDisplayNodes()
    return node


def _default_terminology() -> str:
    return slicer.vtkSegment().GetTerminology() if hasattr(slicer.vtkSegment, "GetTerminology") else ""


def _class_terminologies(mapping: list[SegmentClass], schema: ClassSchema) -> dict[str, str]:
    """Terminology to put on each output class: the input's, when every input segment of that class
    carries the same non-default entry (so the user's own coding is kept), else the schema's
    standard code (SNOMED CT, :data:`AnatomyDTLib.schema.BRAIN_TERMINOLOGY`)."""
    default = _default_terminology()
    found: dict[str, set[str]] = {}
    for m in mapping:
        if m.class_name is not None:
            found.setdefault(m.class_name, set()).add(m.terminology or "")
    kept = {cls: next(iter(terms)) for cls, terms in found.items()
            if len(terms) == 1 and next(iter(terms)) not in ("", default)}
    return {**dict(schema.terminology), **kept}


def _fill_segmentation(node, labels: np.ndarray, reference_volume_node, schema: ClassSchema,
                       tags: Mapping[str, str], terminologies: Mapping[str, str]) -> None:
    """One segment per non-background class (IDs and names = class names, schema colours), all in one
    shared labelmap layer whose label values are the class indices (shifted by one if class 0 is not
    the background), on the reference volume's grid."""
    background = schema.background_index
    value_of = [0 if k == background else (k if background == 0 else k + 1) for k in range(schema.num_classes)]
    lookup = np.asarray(value_of, dtype=np.int32)
    values = lookup[labels].astype(label_dtype(int(lookup.max()) + 1))
    shared = slicer.vtkOrientedImageData()
    shared.ShallowCopy(_image_data(values, numpy_support.get_vtk_array_type(values.dtype)))
    shared.SetImageToWorldMatrix(_numpy_to_matrix(_ijk_to_ras(reference_volume_node)))
    segmentation = node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(labelmap_name)
    else:  # Slicer < 5.4
        segmentation.SetMasterRepresentationName(labelmap_name)
    for k, name in enumerate(schema.names):
        if k == background:
            continue
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*schema.colors[k])
        segment.SetLabelValue(int(value_of[k]))
        segment.AddRepresentation(labelmap_name, shared)
        if name in terminologies:
            segment.SetTerminology(terminologies[name])
        for key, value in tags.items():
            segment.SetTag(key, str(value))
        if not segmentation.AddSegment(segment, name):
            raise InputError(f"Could not add segment {name!r} to {_node_label(node)}.")


def _probability_lut(scene):
    """The warm colour table of the tumour-probability overlay: one shared node per scene.

    Returns ``(node, created)``.
    """
    existing = scene.GetSingletonNode(_LUT_SINGLETON_TAG, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing, False
    node = slicer.vtkMRMLColorTableNode()
    node.SetSingletonTag(_LUT_SINGLETON_TAG)
    node.SetName(_LUT_NAME)
    node.SetTypeToUser()
    node.SetHideFromEditors(False)
    n = 256
    node.SetNumberOfColors(n)
    node.GetLookupTable().SetTableRange(0.0, 1.0)
    for i in range(n):
        t = i / (n - 1)  # black -> red -> orange -> yellow -> white ("hot")
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"p={t:.2f}", r, g, b, 1.0)
    scene.AddNode(node)
    return node, True


def _probability_volume(scene, name: str, probability: np.ndarray, geometry: Geometry, lut_node):
    node = add_volume_from_array(scene, probability.astype(np.float32, copy=False), geometry, name)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(lut_node.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(_PROBABILITY_DISPLAY_THRESHOLD, 1.0)
    display.ApplyThresholdOn()
    return node


_DAY_DESCRIPTION = "days after the baseline scan (0 = baseline)"


def _volume_table(scene, name: str, rows: list[tuple[float, dict[str, float]]], schema: ClassSchema,
                  day_description: str = _DAY_DESCRIPTION):
    """A table node: day, then one column per non-background class in mL."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    classes = [c for c in schema.names if c != schema.background]
    columns = {}
    for column_name in ["day"] + classes:
        array = vtk.vtkDoubleArray()
        array.SetName(column_name)
        table.AddColumn(array)
        columns[column_name] = array
    table.SetNumberOfRows(len(rows))
    for r, (day, volumes) in enumerate(rows):
        table.SetValue(r, 0, float(day))
        for c, cls in enumerate(classes, start=1):
            table.SetValue(r, c, float(volumes.get(cls, 0.0)))
    table_node.SetColumnUnitLabel("day", "day")
    table_node.SetColumnDescription("day", day_description)
    for cls in classes:
        table_node.SetColumnUnitLabel(cls, "mL")
        table_node.SetColumnDescription(cls, f"{cls} volume (argmax voxel count x voxel volume)")
    table_node.Modified()
    return table_node


def _volume_chart(scene, name: str, table_node, schema: ClassSchema, x_title: str = "days after baseline"):
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle("volume (mL)")
    series_nodes = []
    for k, cls in enumerate(schema.names):
        if cls == schema.background:
            continue
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name}: {cls}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("day")
        series.SetYColumnName(cls)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(*schema.colors[k])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series_nodes.append(series)
    return chart, series_nodes


def _show_overlay(scene, reference_volume_node, overlay_node, previous: list) -> None:
    """Overlay ``overlay_node`` on the FLAIR in every slice view; ``previous`` receives what to restore
    on failure (filled before each change).

    Qt-free: only the slice composite nodes are changed; there are none without a view layout.
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        previous.append((composite, composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID(),
                         composite.GetForegroundOpacity()))
        composite.SetBackgroundVolumeID(reference_volume_node.GetID())
        composite.SetForegroundVolumeID(overlay_node.GetID())
        composite.SetForegroundOpacity(_OVERLAY_OPACITY)


def _restore_overlay(previous) -> None:
    for composite, background, foreground, opacity in previous:
        composite.SetBackgroundVolumeID(background)
        composite.SetForegroundVolumeID(foreground)
        composite.SetForegroundOpacity(opacity)


def _unique_name(scene, base: str, replace: bool) -> str:
    if replace or scene.GetFirstNodeByName(base) is None:
        return base
    return scene.GenerateUniqueName(base)


def _format_day(day: float) -> str:
    return f"{day:g}"


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def predict_into_scene(scene, segmentation_node, reference_volume_node, *, days, plan=None,
                       class_map: Mapping[Any, Any] | None = None, model: Any = "default",
                       progress: ProgressCallback | None = None, cancel: CancelCallback | None = None,
                       replace: bool = False, device: str = "cpu", complete_anatomy: bool = False,
                       soften_mm: float = 0.0, create_surfaces: bool = True,
                       schema: ClassSchema = DEFAULT_SCHEMA) -> dict:
    """Predict the anatomy at ``days`` and add the result to ``scene`` as new nodes.

    Args:
        scene: the vtkMRMLScene holding both input nodes (``slicer.mrmlScene`` in the application).
        segmentation_node: baseline segmentation (vtkMRMLSegmentationNode) with at least a tumour
            segment; other segments: white matter, cortical grey matter, lateral ventricles.
        reference_volume_node: the FLAIR (scalar volume); its voxel grid is the prediction grid.
        days: a day or days after the baseline scan (> 0); one output segmentation per day.
        plan: treatment plan: ``None`` (no treatment), a plan dict (format of docs/plan.md; numpy
            arrays allowed for ``resection_mask``/``dose_map``, see :func:`resection_mask_from_segment`
            and :func:`dose_array_from_volume`), a JSON path, or a ``TreatmentPlan``. Mask and dose
            files named by the plan are resampled onto the reference grid.
        class_map: segment name or ID -> class name (or ``None``/``"ignore"``); overrides the
            automatic mapping by name and terminology (:func:`segment_classes`).
        model: ``"default"`` (bundled trained model), ``"pde-only"`` (mechanistic model with
            literature parameters), or a weights file path.
        progress: called with the overall fraction done in [0, 1] (the Slicer module calls
            ``slicer.app.processEvents()`` there).
        cancel: polled during the run; returning True stops it with :class:`~AnatomyDTLib.errors.Cancelled`
            and leaves the scene as it was.
        replace: remove the nodes of earlier runs on the same segmentation (after this run
            succeeded) instead of adding alongside them.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        complete_anatomy: fill missing white matter / grey matter / ventricles from the atlas registered
            to the FLAIR (``AnatomyDTLib.brain.completion.complete_anatomy``); only missing classes are
            filled, only where the segmentation has background; segments mapped to background (a
            cavity) stay background. InputError if completion is not installed.
        soften_mm: Gaussian softening of the one-hot baseline (mm), as in ``AnatomyState.from_labelmap``.
        create_surfaces: build closed-surface (3D) representations of the predicted segmentations.

    Returns:
        A dict of the created nodes:

        * ``"segmentations"``: one vtkMRMLSegmentationNode per day, named ``"<input> +<day> d"``, one
          segment per non-background class (ID and name = class name, schema colour, DICOM
          AUTOMATIC algorithm tags + model version, terminology copied from the input where it was
          set), reference-image geometry = the FLAIR, under the FLAIR's study in the subject hierarchy;
        * ``"tumour_probability"``: one float volume per day in [0, 1] with a warm colour map;
        * ``"table"`` (class volumes in mL per day, day 0 = baseline), ``"plot_chart"``, ``"plot_series"``;
        * with several days: ``"sequence"`` and ``"probability_sequence"`` (index "time" in days),
          ``"sequence_browser"``, ``"segmentation_proxy"``, ``"probability_proxy"``;
        * ``"color_table"`` when the probability colour table was created by this run.

        Every node carries the attributes ``AnatomyDT.SourceSegmentationID``, ``AnatomyDT.RunID``,
        ``AnatomyDT.Role`` (and ``AnatomyDT.Day`` where it applies).

    Raises:
        InputError: unusable input (message says what to do); PlanError: invalid plan;
        Cancelled: ``cancel()`` returned True. In every case no node is left behind.
    """
    from .plan import load_plan, plan_summary
    from .predict import predict
    from .state import AnatomyState

    if scene is None:
        raise InputError("No MRML scene given.")
    for node, what in ((segmentation_node, "segmentation"), (reference_volume_node, "reference volume")):
        if node is None:
            raise InputError(f"Select the {what}.")
        if node.GetScene() is not scene:
            raise InputError(f"The {what} {_node_label(node)} is not in this scene.")
    days_list = sorted({float(d) for d in np.atleast_1d(np.asarray(days, dtype=float)).tolist()})
    if not days_list or days_list[0] <= 0:
        raise InputError(f"Prediction days must be > 0 (days after the baseline scan), got {days}.")

    _check_progress_and_cancel(progress, cancel, 0.0)
    _ensure_segmentation_converters()
    baseline_volume, explicit_background = _read_baseline(segmentation_node, reference_volume_node, class_map, schema,
                                                          scene)
    mapping = segment_classes(segmentation_node, class_map, schema)
    geometry, shape = baseline_volume.geometry, baseline_volume.shape
    _check_progress_and_cancel(progress, cancel, 0.02)
    if complete_anatomy and missing_classes(baseline_volume, schema):
        if not completion_available():
            raise InputError("Anatomy completion was requested but AnatomyDTLib.brain.completion is not installed "
                             "in this version; segment the missing classes or turn completion off.")
        flair = _volume_array(reference_volume_node).astype(np.float32)
        baseline_volume = _complete_anatomy(
            baseline_volume, flair, explicit_background,
            progress=(lambda f: progress(0.02 + 0.2 * float(f))) if progress is not None else None)
        _check_progress_and_cancel(progress, cancel, 0.22)
        read_end = 0.22
    else:
        read_end = _PROGRESS_READ
    _check_progress_and_cancel(progress, cancel, read_end)

    treatment = load_plan(plan, schema=schema)
    treatment = treatment.with_loaded_arrays(_plan_file_loader(geometry, shape), grid_shape=shape)
    notes = treatment.events_after_horizon(days_list[-1])
    summary = plan_summary(treatment)

    baseline = AnatomyState.from_labelmap(baseline_volume, soften_mm)
    forecast_end = _PROGRESS_FORECAST_END_WITH_SURFACES if create_surfaces else _PROGRESS_FORECAST_END
    forecast_end = max(forecast_end, read_end + 0.05)  # the anatomy completion took the bar's start
    span = forecast_end - read_end

    def on_progress(fraction: float) -> None:
        if progress is not None:
            progress(read_end + span * float(fraction))

    prediction = predict(baseline, days=days_list, plan=treatment, model=model, device=device,
                         progress=on_progress, cancel=cancel)
    _check_progress_and_cancel(progress, cancel, forecast_end)

    run_id = secrets.token_hex(6)

    def build(result: dict, created: list) -> None:
        _build_outputs(scene, segmentation_node, reference_volume_node, prediction, mapping, schema, result, created,
                       run_id=run_id, replace=replace, create_surfaces=create_surfaces, summary=summary, notes=notes,
                       progress=progress, cancel=cancel, progress_start=forecast_end)

    result = _add_outputs(scene, reference_volume_node, segmentation_node, build, _prediction_overlay, run_id=run_id,
                          replace=replace, kind=_KIND_PREDICTION, progress=progress, cancel=cancel)
    for note in notes:
        logger.info("AnatomyDT: %s", note)
    return result


def _prediction_overlay(result: Mapping[str, Any]):
    """The probability node to overlay: the sequence proxy with several days, else the only map."""
    return result.get("probability_proxy") or result["tumour_probability"][-1]


def _add_outputs(scene, reference_volume_node, source_node, build: Callable[[dict, list], None],
                 overlay: Callable[[Mapping[str, Any]], Any], *, run_id: str, replace: bool, kind: str,
                 progress: ProgressCallback | None, cancel: CancelCallback | None) -> dict:
    """Create a run's output nodes all or nothing.

    ``build(result, created)`` adds the nodes (into the ``result`` dict); then ``overlay(result)`` is
    shown over the reference volume in the slice views. If anything fails or is cancelled, every
    node added since this call (with its display, storage and proxy nodes) is removed and the slice
    views are restored. With ``replace``, the earlier runs of the same ``kind`` on ``source_node``
    are removed once this one has finished.
    """
    result: dict[str, Any] = {}
    created: list = []
    overlay_previous: list = []
    existing_ids = _node_ids(scene)
    try:
        build(result, created)
        node = overlay(result)
        if node is not None:
            _show_overlay(scene, reference_volume_node, node, overlay_previous)
        _check_progress_and_cancel(progress, cancel, 1.0)
    except BaseException:
        _restore_overlay(overlay_previous)
        _remove_nodes(scene, [n for n in _nodes(scene) if n.GetID() not in existing_ids])
        raise
    if replace:
        _remove_earlier_runs(scene, source_node, run_id, kind)
    return result


def _marker(created: list, source_node, reference_volume_node, run_id: str, model_label: str, kind: str):
    """``mark(node, role, day=None)``: records a new output node and sets its AnatomyDT attributes."""

    def mark(node, role: str, day: float | None = None):
        created.append(node)
        node.SetAttribute(_ATTR_SOURCE, source_node.GetID())
        node.SetAttribute(_ATTR_REFERENCE, reference_volume_node.GetID())
        node.SetAttribute(_ATTR_RUN, run_id)
        node.SetAttribute(_ATTR_ROLE, role)
        node.SetAttribute(_ATTR_KIND, kind)
        if model_label:
            node.SetAttribute(_ATTR_MODEL, model_label)
        if day is not None:
            node.SetAttribute(_ATTR_DAY, _format_day(day))
        return node

    return mark


def _volume_array(volume_node) -> np.ndarray:
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]).copy()


def _build_outputs(scene, segmentation_node, reference_volume_node, prediction, mapping, schema, result, created, *,
                   run_id: str, replace: bool, create_surfaces: bool, summary: str, notes: list[str],
                   progress, cancel, base_name: str | None = None, day_offset: float = 0.0,
                   day_label: Callable[[float], str] | None = None, kind: str = _KIND_PREDICTION,
                   day_description: str = _DAY_DESCRIPTION, chart_x_title: str = "days after baseline",
                   progress_start: float = _PROGRESS_PREDICT_END) -> None:
    """Create all output nodes; every node is appended to ``created`` as soon as it exists. The
    progress bar goes from ``progress_start`` to :data:`_PROGRESS_DAYS_END` over the days' nodes.

    ``segmentation_node`` is the node the outputs are named after and attributed to (for a
    calibration: the last history scan, or the sequence holding the history). ``base_name``
    replaces its name in the node names; ``day_offset`` is added to the prediction's days (which
    count from its baseline) wherever a day is shown; ``day_label(day)`` formats a day in node
    names (default ``"+90 d"``).
    """
    input_name = base_name or segmentation_node.GetName() or "segmentation"
    parent_item = _study_item_of(scene, reference_volume_node)
    tags = prediction.segment_tags()
    terminologies = _class_terminologies(mapping, schema)
    several = len(prediction.days) > 1
    model_label = f"{prediction.model_name} {prediction.model_version}"
    mark = _marker(created, segmentation_node, reference_volume_node, run_id, model_label, kind)
    day_label = day_label or (lambda d: f"+{_format_day(d)} d")

    lut, lut_created = _probability_lut(scene)
    if lut_created:
        created.append(lut)
        result["color_table"] = lut
    result["segmentations"], result["tumour_probability"] = [], []
    n_days = len(prediction.days)
    day_span = (_PROGRESS_DAYS_END - progress_start) / n_days
    for i, model_day in enumerate(prediction.days):
        _check_progress_and_cancel(progress, cancel, progress_start + day_span * i)
        day = float(model_day) + float(day_offset)
        label = day_label(day)
        seg = mark(scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           _unique_name(scene, f"{input_name} {label}", replace)), "segmentation", day)
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        _fill_segmentation(seg, prediction.labels(i), reference_volume_node, schema, tags, terminologies)
        if create_surfaces:
            _check_progress_and_cancel(progress, cancel, progress_start + day_span * (i + 1 - _SURFACES_SHARE_OF_A_DAY))
            seg.CreateClosedSurfaceRepresentation()
        if several:
            seg.GetDisplayNode().SetVisibility(False)  # the sequence proxy shows the time course
        _place_in_hierarchy(scene, seg, parent_item)
        result["segmentations"].append(seg)

        prob = mark(_probability_volume(scene, _unique_name(scene, f"{input_name} tumour probability {label}", replace),
                                        prediction.tumour_probability(i), prediction.geometry, lut),
                    "tumour_probability", day)
        _place_in_hierarchy(scene, prob, parent_item)
        result["tumour_probability"].append(prob)

    _check_progress_and_cancel(progress, cancel, _PROGRESS_DAYS_END)
    if several:
        _build_sequences(scene, input_name, result, mark, parent_item, replace)

    _check_progress_and_cancel(progress, cancel, _PROGRESS_DAYS_END + 0.02)
    rows = [(float(d) + float(day_offset), volumes) for d, volumes in prediction.volumes_ml()]
    table = mark(_volume_table(scene, _unique_name(scene, f"{input_name} predicted volumes", replace), rows, schema,
                               day_description), "volume_table")
    table.SetAttribute(_ATTR_PLAN, summary)
    table.SetAttribute(_ATTR_NOTES, "\n".join(notes))
    _place_in_hierarchy(scene, table, parent_item)
    result["table"] = table
    chart_name = _unique_name(scene, f"{input_name} predicted volumes chart", replace)
    chart, series_nodes = _volume_chart(scene, chart_name, table, schema, chart_x_title)
    mark(chart, "volume_chart")
    for series in series_nodes:
        mark(series, "volume_series")
    _place_in_hierarchy(scene, chart, parent_item)
    result["plot_chart"], result["plot_series"] = chart, series_nodes


def _build_sequences(scene, input_name: str, result: dict, mark, parent_item: int, replace: bool) -> None:
    """Sequences of the per-day segmentations and probability maps, browsed together."""
    logic, owned = _sequences_logic(scene)
    try:
        sequences = {}
        for key, role, suffix in (("segmentations", "sequence", "prediction"),
                                  ("tumour_probability", "probability_sequence", "tumour probability")):
            sequence = mark(scene.AddNewNodeByClass("vtkMRMLSequenceNode",
                                                    _unique_name(scene, f"{input_name} {suffix}", replace)), role)
            sequence.SetIndexName("time")
            sequence.SetIndexUnit("day")
            sequence.SetIndexType(sequence.NumericIndex)
            for node in result[key]:
                sequence.SetDataNodeAtValue(node, node.GetAttribute(_ATTR_DAY))
            sequences[role] = sequence
            result[role] = sequence
        browser = mark(scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                               _unique_name(scene, f"{input_name} prediction browser", replace)),
                       "sequence_browser")
        browser.SetAndObserveMasterSequenceNodeID(sequences["sequence"].GetID())
        browser.AddSynchronizedSequenceNodeID(sequences["probability_sequence"].GetID())
        browser.SetIndexDisplayFormat("%.0f")
        result["sequence_browser"] = browser
        logic.UpdateProxyNodesFromSequences(browser)
        for role, proxy_key in (("sequence", "segmentation_proxy"), ("probability_sequence", "probability_proxy")):
            proxy = browser.GetProxyNode(sequences[role])
            if proxy is None:
                raise InputError("The sequence browser made no proxy node; is the Sequences module available?")
            mark(proxy, proxy_key)
            proxy.CreateDefaultDisplayNodes()
            _place_in_hierarchy(scene, proxy, parent_item)
            result[proxy_key] = proxy
        source_display = result["tumour_probability"][0].GetDisplayNode()
        proxy_display = result["probability_proxy"].GetDisplayNode()
        if proxy_display is not None and source_display is not None:
            proxy_display.CopyContent(source_display) if hasattr(proxy_display, "CopyContent") \
                else proxy_display.Copy(source_display)
        seg_display = result["segmentation_proxy"].GetDisplayNode()
        if seg_display is not None:
            seg_display.SetVisibility(True)
    finally:
        if owned:
            logic.SetMRMLScene(None)


def _nodes(scene) -> list:
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()) if scene.GetNthNode(i) is not None]


def _node_ids(scene) -> set[str]:
    return {node.GetID() for node in _nodes(scene)}


def _remove_nodes(scene, nodes) -> None:
    """Remove nodes together with their display and storage nodes (last added first)."""
    doomed, seen = [], set()
    for node in nodes:
        dependents = []
        if node.IsA("vtkMRMLDisplayableNode"):
            dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        for n in [node] + dependents:
            if n is not None and n.GetID() not in seen:
                seen.add(n.GetID())
                doomed.append(n)
    for node in reversed(doomed):
        if node.GetScene() is scene:
            scene.RemoveNode(node)


def _remove_earlier_runs(scene, segmentation_node, run_id: str, kind: str = _KIND_PREDICTION) -> None:
    """Remove the outputs of earlier runs of ``kind`` on ``segmentation_node`` (nodes without a kind
    attribute, from earlier versions, count as predictions)."""
    old = [node for node in _nodes(scene)
           if node.GetAttribute(_ATTR_SOURCE) == segmentation_node.GetID()
           and node.GetAttribute(_ATTR_RUN) not in (None, run_id)
           and (node.GetAttribute(_ATTR_KIND) or _KIND_PREDICTION) == kind]
    _remove_nodes(scene, old)


# --------------------------------------------------------------------------------------------
# Calibration on earlier scans, growth-probability maps
# --------------------------------------------------------------------------------------------

_DAY_TOLERANCE = 1e-9


def history_from_sequence(sequence_node, days: Sequence[float] | None = None) -> list[tuple[Any, float]]:
    """The ``(segmentation node, day)`` pairs of a sequence node holding one segmentation per scan.

    Args:
        sequence_node: a vtkMRMLSequenceNode whose data nodes are segmentation nodes, oldest scan first.
        days: the day of every item, in item order, on the treatment plan's day axis. ``None``: use
            the sequence's index values, which must then be numbers of days (a numeric index whose
            unit is empty, ``d``, ``day`` or ``days``); any other index needs explicit days.

    The returned nodes are the sequence's own data nodes: they are read, never modified.

    Raises:
        InputError: not a sequence node, an item that is not a segmentation, index values that are
            not days (without ``days``), or a wrong number of days.
    """
    if sequence_node is None or not hasattr(sequence_node, "IsA") or not sequence_node.IsA("vtkMRMLSequenceNode"):
        raise InputError("Select the sequence that holds the earlier segmentations (one item per scan).")
    count = sequence_node.GetNumberOfDataNodes()
    nodes = [sequence_node.GetNthDataNode(i) for i in range(count)]
    bad = [i + 1 for i, node in enumerate(nodes) if node is None or not node.IsA("vtkMRMLSegmentationNode")]
    if bad:
        raise InputError(f"Item(s) {', '.join(map(str, bad))} of the sequence {_node_label(sequence_node)} are not "
                         "segmentations; the history sequence must hold one segmentation node per scan.")
    if days is None:
        unit = (sequence_node.GetIndexUnit() or "").strip().lower()
        values: list[float] = []
        numeric = sequence_node.GetIndexType() == sequence_node.NumericIndex and unit in ("", "d", "day", "days")
        if numeric:
            try:
                values = [float(sequence_node.GetNthIndexValue(i)) for i in range(count)]
            except ValueError:
                numeric = False
        if not numeric:
            raise InputError(
                f"The index of the sequence {_node_label(sequence_node)} ({sequence_node.GetIndexName() or 'index'}"
                f"{f' in {unit}' if unit else ''}) is not a number of days; give the day of every scan "
                "(days on the treatment plan's axis, oldest scan first).")
    else:
        values = [float(d) for d in np.atleast_1d(np.asarray(days, dtype=float)).tolist()]
        if len(values) != count:
            raise InputError(f"The sequence {_node_label(sequence_node)} holds {count} segmentations but {len(values)} "
                             "days were given; give one day per item, in item order.")
    return list(zip(nodes, values))


def _history_pair(item, i: int):
    """``(segmentation node, day)`` of history entry ``i`` (1-based, for messages), checked for shape and type."""
    try:
        node, day = item
    except (TypeError, ValueError):
        raise InputError(f"History entry {i} is not a (segmentation node, day) pair.") from None
    if node is None or not hasattr(node, "IsA") or not node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"History entry {i}: select a segmentation node (got {type(node).__name__}).")
    return node, day


def _history_items(history, scene, *, in_sequence: bool) -> list[tuple[Any, float, str]]:
    """Checked ``(node, day, label)`` of a history: >= 2 scans, finite days >= 0, strictly increasing."""
    try:
        items = list(history)
    except TypeError:
        raise InputError("Give the history as a list of (segmentation node, day) pairs or as a sequence node of "
                         "segmentations.") from None
    checked = []
    for i, item in enumerate(items, start=1):
        node, day = _history_pair(item, i)
        if not in_sequence and node.GetScene() is not scene:
            raise InputError(f"History entry {i}: the segmentation {_node_label(node)} is not in this scene.")
        try:
            day = float(day)
        except (TypeError, ValueError):
            raise InputError(f"History entry {i} ({_node_label(node)}): the day {day!r} is not a number.") from None
        if not (np.isfinite(day) and day >= 0):
            raise InputError(f"History entry {i} ({_node_label(node)}): the day must be a finite number >= 0 on the "
                             f"treatment plan's axis (day 0 = the day its events count from), got {day:g}.")
        checked.append((node, day, f"{_node_label(node)} (day {day:g})"))
    if len(checked) < 2:
        raise InputError(f"Calibration needs at least 2 scans with their days (got {len(checked)}): the first is "
                         "rolled forward and compared with the later ones. Add an earlier scan.")
    for (_, day_a, label_a), (_, day_b, label_b) in zip(checked, checked[1:]):
        if abs(day_b - day_a) <= _DAY_TOLERANCE:
            raise InputError(f"Two scans are on the same day {day_a:g}: {label_a} and {label_b}. Give each scan its "
                             "own day.")
        if day_b < day_a:
            raise InputError(f"Scan days must increase, oldest scan first: {label_a} comes before {label_b}. "
                             "Order the scans by day.")
    return checked


def _segmentation_grid(segmentation_node) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """IJK-to-RAS (IJK counted from the first voxel) and dimensions ``(i, j, k)`` of a segmentation's
    own reference image geometry, or None if it has none."""
    serialized = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not serialized:
        return None
    grid = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, grid, False):
        return None
    extent = grid.GetExtent()
    dims = tuple(int(extent[2 * a + 1] - extent[2 * a] + 1) for a in range(3))
    if min(dims) < 2:
        return None
    matrix = vtk.vtkMatrix4x4()
    grid.GetImageToWorldMatrix(matrix)
    ijk_to_ras = _matrix_to_numpy(matrix)
    ijk_to_ras[:3, 3] += ijk_to_ras[:3, :3] @ np.asarray(extent[0::2], dtype=float)
    return ijk_to_ras, dims


def _read_scan(scene, segmentation_node, reference_volume_node, class_map, schema: ClassSchema, *,
               on_reference: bool) -> LabelVolume:
    """A scan's class labelmap with the class mapping of :func:`read_baseline`.

    ``on_reference``: on the reference volume's grid, refusing a segmentation drawn on another grid
    (as :func:`read_baseline`). Otherwise on the reference grid when the segmentation was drawn on
    the same voxel lattice, else on the segmentation's own reference grid (a temporary volume node,
    removed again); the calibration resamples it in physical space.
    """
    if not on_reference:
        own = _segmentation_grid(segmentation_node)
        if own is not None and not _same_lattice(own[0], _ijk_to_ras(reference_volume_node)):
            ijk_to_ras, dims = own
            with _TemporaryNodes(scene):
                grid_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                    f"{segmentation_node.GetName() or 'scan'} grid")
                grid_node.SetHideFromEditors(True)
                grid_node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras))
                grid_node.SetAndObserveImageData(_image_data(np.zeros(dims[::-1], np.uint8), vtk.VTK_UNSIGNED_CHAR))
                return _read_baseline(segmentation_node, grid_node, class_map, schema, scene)[0]
    return _read_baseline(segmentation_node, reference_volume_node, class_map, schema, scene)[0]


def _check_scene_inputs(scene, nodes_and_roles) -> None:
    if scene is None:
        raise InputError("No MRML scene given.")
    for node, what in nodes_and_roles:
        if node is None:
            raise InputError(f"Select the {what}.")
        if node.GetScene() is not scene:
            raise InputError(f"The {what} {_node_label(node)} is not in this scene.")


def _table_node(scene, name: str, columns: Sequence[tuple[str, str, str, str]], rows: Sequence[Sequence[Any]]):
    """A table node; ``columns`` are ``(name, "str" or "float", unit, description)``, rows match them
    (``None`` in a float column is NaN)."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    for column_name, kind, _, _ in columns:
        array = vtk.vtkStringArray() if kind == "str" else vtk.vtkDoubleArray()
        array.SetName(column_name)
        table.AddColumn(array)
    table.SetNumberOfRows(len(rows))
    for r, row in enumerate(rows):
        for c, ((_, kind, _, _), value) in enumerate(zip(columns, row)):
            if kind == "str":
                table.SetValue(r, c, vtk.vtkVariant(str(value)))
            else:
                table.SetValue(r, c, vtk.vtkVariant(float("nan") if value is None else float(value)))
    for column_name, _, unit, description in columns:
        if unit:
            table_node.SetColumnUnitLabel(column_name, unit)
        table_node.SetColumnDescription(column_name, description)
    table_node.Modified()
    return table_node


_PARAMETER_COLUMNS = (("name", "str", "", "quantity"), ("value", "float", "", "value"),
                      ("unit", "str", "", "unit of the value"), ("note", "str", "", "what it is, where it comes from"))


def _fit_table(scene, name: str, calibration):
    """Per later history scan: how well the calibrated model reproduces it."""
    columns = (("scan", "str", "", "history scan (segmentation node)"),
               ("day", "float", "day", "scan day on the treatment plan's axis"),
               ("measured_tumour_ml", "float", "mL", "tumour volume of the scan (voxel count x voxel volume)"),
               ("fitted_tumour_ml", "float", "mL", "tumour volume of the calibrated model rolled forward from the "
                                                   "first scan to this day"),
               ("volume_error_ml", "float", "mL", "fitted minus measured tumour volume"),
               ("tumour_dice", "float", "", "Dice of the fitted and the measured tumour (on the fit crop)"),
               ("tumour_dice_at_start", "float", "", "the same Dice with the starting (literature) parameters"))
    rows = [[f.name, f.day, f.observed_tumour_ml, f.fitted_tumour_ml, f.volume_error_ml, f.tumour_dice,
             f.initial_tumour_dice] for f in calibration.fits]
    return _table_node(scene, name, columns, rows)


def _calibrated_parameter_rows(calibration) -> list[list]:
    from .calibration import PUSHED, TISSUES

    params = calibration.parameters
    rows = []
    by_tissue = params.tumour_diffusion_by_tissue or {}
    for tissue in TISSUES:
        if tissue in by_tissue:
            rows.append([f"tumour diffusion in {tissue}", by_tissue[tissue], "mm²/day", "fitted (D)"])
    alpha_map = calibration.growth_rate_map()
    rows.append(["tumour growth rate", params.growth_rate, "1/day",
                 "fitted (α); the scalar α0 of the fitted α field" if alpha_map is not None else "fitted (α)"])
    if alpha_map is not None:
        rows.append(["growth rate map minimum", float(alpha_map.min()), "1/day", "α(x) on the last scan's grid"])
        rows.append(["growth rate map maximum", float(alpha_map.max()), "1/day", "α(x) on the last scan's grid"])
    for tissue in PUSHED:
        value = params.cross_diffusion.get(tissue, {}).get(DEFAULT_SCHEMA.tumour)
        if value is not None:
            rows.append([f"mass effect on {tissue}", value, "mm²/day",
                         "fitted χ (< 0: the tumour pushes this tissue away)"])
    if calibration.plan.radiotherapy is not None:
        rows.append(["radiosensitivity factor", calibration.radiosensitivity_scale, "",
                     "fitted factor on the plan's radiotherapy LQ α and β (1 = as planned)"])
        dying = calibration.to_dict()["radiotherapy"]["delayed_death"]
        if dying is not None:
            source = "assumed (the plan has none)" if calibration.delayed_death_assumed else "the plan's"
            rows.append(["death delay of irradiated cells", dying["delay_days"], "day",
                         f"{source}: killed cells stay visible this long"])
            start = "assumed" if calibration.delayed_death_assumed else "plan's"
            rows.append(["clearance half-life", dying["clearance_half_life_days"], "day",
                         f"fitted to the history (started from the {start} half-life)" if calibration.clearance_fitted
                         else f"{source}: then they clear with this half-life"])
            if dying["carried_into_forecast"]:
                rows.append(["dying share of the last scan's tumour", dying["dying_share_of_last_scan_tumour"], "",
                             "from the fitted history: lethally hit at the last scan; the forecast lets it clear"])
        hypoxia = calibration.plan.radiotherapy.hypoxia
        if hypoxia is not None:
            source = "assumed (the plan has none)" if calibration.hypoxia_assumed else "the plan's"
            if calibration.hypoxia_fitted:
                start = "assumed" if calibration.hypoxia_assumed else "plan's"
                source = f"fitted to the history (started from the {start} ratio)"
            rows.append(["oxygen enhancement ratio of dense tumour", hypoxia.oxygen_enhancement_ratio, "",
                         f"{source}: each fraction's dose is divided by up to this where tumour fills "
                         f"{100 * hypoxia.dense_from:.0f}-{100 * hypoxia.dense_to:.0f} % of a voxel"])
    if calibration.infiltration_length_mm is not None:
        rows.append(["infiltration length", calibration.infiltration_length_mm, "mm",
                     "fitted e-folding length of the tumour density beyond the visible edge"])
    if calibration.visibility_threshold is not None:
        rows.append(["visibility threshold", calibration.visibility_threshold, "",
                     "tumour density (fraction of capacity) a scan shows as tumour (setting)"])
    if calibration.edge_width_mm is not None:
        rows.append(["tumour edge width", calibration.edge_width_mm, "mm", "fitted width of the start field's edge"])
    rows.append(["time step", params.dt_days, "day", "solver step of the fit and the forecast"])
    rows.append(["iterations", calibration.iterations, "", f"fit stopped: {calibration.stop_reason}"])
    if calibration.loss_history:
        rows.append(["loss at start", calibration.loss_history[0]["loss"], "", "fit loss, first iteration"])
        rows.append(["best loss", min(r["loss"] for r in calibration.loss_history), "", "fit loss, kept iterate"])
    return rows


def calibrate_into_scene(scene, history, reference_volume_node, *, days, history_days: Sequence[float] | None = None,
                         plan=None, settings=None, class_map: Mapping[Any, Any] | None = None,
                         progress: ProgressCallback | None = None, cancel: CancelCallback | None = None,
                         replace: bool = False, output_name: str | None = None,
                         create_surfaces: bool = True, ensemble_members: int = 0, ensemble_seed: int = 0) -> dict:
    """Calibrate the PDE on a patient's earlier scans, forecast from the last one, add the result to ``scene``.

    The 3D Slicer counterpart of ``anatomydt calibrate`` (:func:`AnatomyDTLib.calibration.calibrate_and_forecast`,
    docs/calibration.md): the tumour's diffusivity per tissue, growth rate and mass effect (and the
    radiosensitivity and tumour-edge parameters) are fitted so that the first scan, rolled forward,
    reproduces the later ones; the calibrated model then forecasts from the LAST scan.

    Days: every day (scan days and ``days``) counts on the treatment plan's day axis: day 0 is the
    day the plan's events count from, usually the first scan.

    Args:
        scene: the vtkMRMLScene (``slicer.mrmlScene``).
        history: the scans, oldest first: a list of ``(segmentation node, day)`` pairs, or a
            vtkMRMLSequenceNode with one segmentation per scan (days from ``history_days``, or from
            the sequence's index values when they are numbers of days, see :func:`history_from_sequence`).
            Segments are mapped to classes as for :func:`read_baseline` (names, terminology, ``class_map``).
        reference_volume_node: the FLAIR of the LAST scan. The last scan must be on its grid (a
            volume on another grid is refused as in :func:`predict_into_scene`); the forecast is
            made and written on that grid. Earlier scans drawn on other grids are read on their own
            grid and resampled onto it (nearest neighbour, physical space).
        days: forecast day(s), after the last scan, on the plan's axis.
        history_days: the scan days of a sequence ``history`` (not used with pairs).
        plan: the treatment plan over the whole history and forecast, on the same day axis (as for
            :func:`predict_into_scene`; arrays must be on the reference grid).
        settings: :class:`~AnatomyDTLib.calibration.CalibrationSettings` (default: scalar α, at most
            30 iterations).
        class_map, progress, cancel, replace, create_surfaces: as :func:`predict_into_scene`.
            ``replace`` removes earlier calibrated runs on the same last scan (or sequence) only.
        output_name: the name the output nodes start with (default ``"<last scan> calibrated"``,
            ``"<sequence> calibrated"`` for a sequence).
        ensemble_members: 0 (default) or 2..256: also forecast that many members over the priors
            of the delayed death of irradiated cells, which two scans cannot fit
            (:func:`AnatomyDTLib.calibration_ensemble.forecast_ensemble`; docs/calibration.md);
            refused before the fit when the plan has no radiotherapy or states its delayed death.
        ensemble_seed: the seed of the members' draws.

    Returns:
        A dict of the created nodes, as :func:`predict_into_scene` (``"segmentations"`` named
        ``"<input> calibrated day 90"``, ``"tumour_probability"``, ``"table"`` (first row: the last
        scan), chart, sequences and browser with several days; days on the plan's axis), plus:

        * ``"fit_table"``: per later scan: ``scan``, ``day``, ``measured_tumour_ml``,
          ``fitted_tumour_ml``, ``volume_error_ml``, ``tumour_dice``, ``tumour_dice_at_start``;
        * ``"parameter_table"``: the fitted parameters: ``name``, ``value``, ``unit``, ``note``;
        * ``"growth_rate_map"``: with ``settings.alpha == "field"``, α(x) in 1/day as a volume;
        * with ``ensemble_members``: ``"ensemble_probability"``, one float volume per day in [0, 1]
          (the fraction of members in which the voxel is tumour; warm colour map), and
          ``"volume_band_table"``: per day the point forecast's tumour volume and the members'
          median, 5-95 % band, min and max (mL).

        The segments carry the DICOM AUTOMATIC tags with the model name ``pde-calibrated``. Every node
        has the attributes of :func:`predict_into_scene` plus ``AnatomyDT.RunKind = calibration``; the
        tables also ``AnatomyDT.HistoryIDs``.

    Raises:
        InputError: fewer than 2 scans; a day that is negative, repeated or out of order; forecast days
            not after the last scan; a scan without tumour; and everything :func:`read_baseline`
            refuses. PlanError, ParameterError (settings). Cancelled. In every case no node is left behind.
    """
    from .calibration import CalibrationSettings, HistoryScan, calibrate_and_forecast
    from .calibration_ensemble import check_ensemble_possible, check_members, forecast_ensemble
    from .plan import load_plan, plan_summary

    schema = DEFAULT_SCHEMA
    _check_scene_inputs(scene, [(reference_volume_node, "reference volume (the FLAIR of the last scan)")])
    is_sequence = hasattr(history, "IsA") and history.IsA("vtkMRMLSequenceNode")
    if is_sequence:
        _check_scene_inputs(scene, [(history, "history sequence")])
        pairs = history_from_sequence(history, history_days)
    else:
        if history_days is not None:
            raise InputError("history_days is for a sequence node; give a list of (segmentation node, day) pairs.")
        pairs = history
    items = _history_items(pairs, scene, in_sequence=is_sequence)
    source_node = history if is_sequence else items[-1][0]
    last_day = items[-1][1]
    values = [float(d) for d in np.atleast_1d(np.asarray(days, dtype=float)).tolist()]
    if not values or not all(np.isfinite(values)) or min(values) <= last_day + _DAY_TOLERANCE:
        raise InputError(f"Forecast days must come after the last scan ({items[-1][2]}), on the same day axis as the "
                         f"scan days; got {', '.join(f'{d:g}' for d in values) or 'none'}.")
    days_list = sorted(set(values))
    if ensemble_members:
        check_members(ensemble_members)

    _check_progress_and_cancel(progress, cancel, 0.0)
    _ensure_segmentation_converters()
    scans = []
    for i, (node, day, label) in enumerate(items):
        volume = _read_scan(scene, node, reference_volume_node, class_map, schema, on_reference=i == len(items) - 1)
        if not (volume.labels == schema.tumour_index).any():
            raise InputError(f"The scan {label} has no tumour voxels; every scan of the history needs a tumour (a "
                             "complete response cannot be fitted by the growth model). Leave it out, or check its "
                             "segment-to-class mapping.")
        scans.append(HistoryScan(volume.labels, volume.geometry, day, node.GetName() or f"scan {i + 1}"))
        _check_progress_and_cancel(progress, cancel, _PROGRESS_READ * (i + 1) / len(items))
    mapping = segment_classes(items[-1][0], class_map, schema)
    geometry, shape = scans[-1].geometry, tuple(scans[-1].labels.shape)
    treatment = load_plan(plan, schema=schema).with_loaded_arrays(_plan_file_loader(geometry, shape), grid_shape=shape)
    notes = treatment.events_after_horizon(days_list[-1])
    summary = plan_summary(treatment)
    if ensemble_members:
        check_ensemble_possible(treatment, (settings or CalibrationSettings()).assumed_delayed_death)
    span = _PROGRESS_PREDICT_END - _PROGRESS_READ
    fit_share = 0.6 if ensemble_members else 1.0  # of the span; the ensemble's members take the rest

    def on_progress(fraction: float) -> None:
        if progress is not None:
            progress(_PROGRESS_READ + span * fit_share * float(fraction))

    def on_ensemble_progress(fraction: float) -> None:
        if progress is not None:
            progress(_PROGRESS_READ + span * (fit_share + (1.0 - fit_share) * float(fraction)))

    calibration, forecast = calibrate_and_forecast(scans, days_list, treatment, settings=settings,
                                                   progress=on_progress, cancel=cancel)
    ensemble = None
    if ensemble_members:
        ensemble = forecast_ensemble(calibration, days_list, members=ensemble_members, seed=ensemble_seed,
                                     progress=on_ensemble_progress, cancel=cancel)
    _check_progress_and_cancel(progress, cancel, _PROGRESS_PREDICT_END)

    run_id = secrets.token_hex(6)
    base = output_name or f"{source_node.GetName() or 'history'} calibrated"
    history_ids = " ".join(node.GetID() for node, _, _ in items if not is_sequence) or history.GetID()
    prediction = forecast.prediction

    def build(result: dict, created: list) -> None:
        _build_outputs(scene, source_node, reference_volume_node, prediction, mapping, schema, result, created,
                       run_id=run_id, replace=replace, create_surfaces=create_surfaces, summary=summary, notes=notes,
                       progress=progress, cancel=cancel, base_name=base, day_offset=forecast.start_day,
                       day_label=lambda d: f"day {_format_day(d)}", kind=_KIND_CALIBRATION,
                       day_description="day on the treatment plan's axis (first row: the last history scan)",
                       chart_x_title="day (treatment plan's axis)")
        mark = _marker(created, source_node, reference_volume_node, run_id,
                       f"{prediction.model_name} {prediction.model_version}", _KIND_CALIBRATION)
        parent_item = _study_item_of(scene, reference_volume_node)
        fit = mark(_fit_table(scene, _unique_name(scene, f"{base} fit on history", replace), calibration), "fit_table")
        parameters = mark(_table_node(scene, _unique_name(scene, f"{base} parameters", replace), _PARAMETER_COLUMNS,
                                      _calibrated_parameter_rows(calibration)), "parameter_table")
        for table in (fit, parameters):
            table.SetAttribute(_ATTR_HISTORY, history_ids)
            table.SetAttribute(_ATTR_PLAN, summary)
            _place_in_hierarchy(scene, table, parent_item)
        result["fit_table"], result["parameter_table"] = fit, parameters
        alpha_map = calibration.growth_rate_map()
        if alpha_map is not None:
            name = _unique_name(scene, f"{base} growth rate map", replace)
            node = mark(add_volume_from_array(scene, alpha_map, geometry, name), "growth_rate_map")
            _place_in_hierarchy(scene, node, parent_item)
            result["growth_rate_map"] = node
        if ensemble is not None:
            _ensemble_outputs(scene, ensemble, prediction, schema, geometry, base, replace, mark, parent_item, result,
                              created)

    result = _add_outputs(scene, reference_volume_node, source_node, build, _prediction_overlay, run_id=run_id,
                          replace=replace, kind=_KIND_CALIBRATION, progress=progress, cancel=cancel)
    for note in notes:
        logger.info("AnatomyDT: %s", note)
    return result


_BAND_DESCRIPTIONS = {
    "day": ("day", "forecast day on the treatment plan's axis"),
    "point_forecast_tumour_ml": ("mL", "tumour volume of the calibrated forecast (the assumed delay and half-life)"),
    "median_tumour_ml": ("mL", "median tumour volume of the ensemble's members"),
    "p5_tumour_ml": ("mL", "5th percentile of the members' tumour volumes"),
    "p95_tumour_ml": ("mL", "95th percentile of the members' tumour volumes"),
    "min_tumour_ml": ("mL", "smallest member"), "max_tumour_ml": ("mL", "largest member"),
    "members": ("", "members (each a delay and half-life drawn from their priors)")}
"""Unit and description of each column of :data:`~AnatomyDTLib.calibration_ensemble.BAND_TABLE_COLUMNS`."""


def _ensemble_outputs(scene, ensemble, prediction, schema: ClassSchema, geometry: Geometry, base: str, replace: bool,
                      mark, parent_item: int, result: dict, created: list) -> None:
    """The calibration ensemble's probability volumes (one per day) and its volume-band table."""
    lut, lut_created = _probability_lut(scene)
    if lut_created:
        created.append(lut)
        result["color_table"] = lut
    nodes = []
    for i, day in enumerate(ensemble.days):
        name = _unique_name(scene, f"{base} tumour probability (ensemble) day {_format_day(day)}", replace)
        node = mark(_probability_volume(scene, name, ensemble.tumour_probability[i], geometry, lut),
                    "ensemble_probability", day)
        _place_in_hierarchy(scene, node, parent_item)
        nodes.append(node)
    from .calibration_ensemble import BAND_TABLE_COLUMNS

    tumour = schema.names[schema.tumour_index]
    rows = ensemble.band_table([v[tumour] for _, v in prediction.volumes_ml()[1:]])
    columns = [(name, "float", *_BAND_DESCRIPTIONS[name]) for name in BAND_TABLE_COLUMNS]
    table = mark(_table_node(scene, _unique_name(scene, f"{base} volume band (ensemble)", replace), columns,
                             rows), "volume_band_table")
    _place_in_hierarchy(scene, table, parent_item)
    result["ensemble_probability"], result["volume_band_table"] = nodes, table


def _history_tumour_volumes(scene, history, segmentation_node, reference_volume_node, class_map,
                            schema: ClassSchema) -> tuple[list[float], list[float]]:
    """(days, tumour mL) of ``(segmentation node, day)`` pairs, each read as :func:`_read_scan` does."""
    try:
        items = list(history)
    except TypeError:
        raise InputError("Give the volume history as (segmentation node, day) pairs.") from None
    days, volumes = [], []
    for i, item in enumerate(items, start=1):
        node, day = _history_pair(item, i)
        volume = _read_scan(scene, node, reference_volume_node, class_map, schema,
                            on_reference=node is segmentation_node)
        days.append(float(day))
        volumes.append(float((volume.labels == schema.tumour_index).sum()) * volume.geometry.voxel_volume_ml)
    return days, volumes


def probability_map_into_scene(scene, segmentation_node, reference_volume_node, *, day, volumes=None, history=None,
                               baseline_day: float = 0.0, plan=None, members: int = 20, bootstrap: int = 1000,
                               seed: int = 0, parameters=None,
                               class_map: Mapping[Any, Any] | None = None, progress: ProgressCallback | None = None,
                               cancel: CancelCallback | None = None, replace: bool = False,
                               output_name: str | None = None) -> dict:
    """Tumour growth-probability map on ``day``, added to ``scene`` as a probability overlay.

    The 3D Slicer counterpart of ``anatomydt probability-map`` (docs/burden.md): the tumour-burden
    model is fitted to measured tumour volumes and bootstrapped; ``members`` volumes on ``day`` are
    drawn from its forecast (stratified quantiles); the PDE's growth rate is steered so that each
    member's tumour has that volume (:func:`AnatomyDTLib.guided.guided_ensemble`); the map is the
    fraction of members in which a voxel is tumour.

    Days: the measurement days and the plan count on the plan's day axis, on which the scan of
    ``segmentation_node`` (the baseline the PDE starts from) is on ``baseline_day``. With the
    default ``baseline_day = 0`` (as ``anatomydt probability-map``) the baseline is day 0 and
    earlier measurements have negative days. ``day`` counts after the baseline scan.

    Args:
        scene, segmentation_node, reference_volume_node, class_map: as :func:`predict_into_scene`.
        day: the forecast day (> 0, days after the baseline scan).
        volumes: measured tumour volumes as ``(days, volumes_ml)`` (two sequences), or
        history: instead of ``volumes``, ``(segmentation node, day)`` pairs whose tumour volumes are
            measured here (voxel count x voxel volume, classes as :func:`read_baseline`; scans on other
            grids are read on their own grid). Include the baseline scan to fit through it.
        baseline_day: the baseline scan's day on the plan's axis (default 0).
        plan: treatment plan (as :func:`predict_into_scene`) on the plan's axis: the burden model's
            schedule, and, seen from ``baseline_day``, the PDE's treatment.
        members: number of guided PDE forecasts (>= 1). bootstrap, seed: the burden bootstrap.
        parameters: PDE parameters (:class:`~AnatomyDTLib.parameters.PDEParameters`, a JSON path or
            dict); default: the literature values.
        progress, cancel, replace: as :func:`predict_into_scene` (``replace`` removes earlier maps of
            this segmentation only).
        output_name: the name the output nodes start with (default: the segmentation's name).

    Returns:
        ``{"probability_map": volume node (float32 in [0, 1] on the reference grid, warm colour map,
        transparent below 0.05, shown over the reference volume), "report": table node (columns
        ``name``, ``value``, ``unit``, ``note``: measured and fitted volumes, the burden parameters
        and their source, R², RMSE, the 90 % band on ``day``, the members and the map's volumes),
        "color_table": only when created}``. Notes (clamped members, a baseline volume far from the
        fit) are in the report's ``AnatomyDT.PlanNotes`` attribute and the log.

    Raises:
        InputError: no or both of ``volumes``/``history``, fewer than 2 volumes, bad days or volumes,
            unusable segmentation; PlanError; ParameterError (members, bootstrap); Cancelled. In
            every case no node is left behind.
    """
    import warnings

    from .burden import DESCRIPTIONS, PARAMETER_NAMES, UNITS, bootstrap_burden, fit_burden, schedule_from_plan
    from .calibration import shift_plan
    from .errors import ParameterError
    from .guided import GuidedForecastWarning, guided_ensemble
    from .parameters import PDEParameters
    from .plan import load_plan, plan_summary
    from .state import AnatomyState

    schema = DEFAULT_SCHEMA
    _check_scene_inputs(scene, [(segmentation_node, "baseline segmentation"),
                                (reference_volume_node, "reference volume")])
    try:
        day = float(day)
    except (TypeError, ValueError):
        raise InputError(f"The forecast day must be a number of days after the baseline scan, got {day!r}.") from None
    if not (np.isfinite(day) and day > 0):
        raise InputError(f"The forecast day must be > 0 (days after the baseline scan), got {day:g}.")
    baseline_day = float(baseline_day)
    if not np.isfinite(baseline_day):
        raise InputError(f"The baseline day must be a finite number of days, got {baseline_day!r}.")
    plan_day = baseline_day + day  # the forecast day on the plan's axis
    if not (isinstance(members, (int, np.integer)) and not isinstance(members, bool) and members >= 1):
        raise ParameterError(f"members must be an integer >= 1, got {members!r}.")
    if (volumes is None) == (history is None):
        raise InputError("Give the measured tumour volumes either as volumes=(days, volumes_ml) or as history="
                         "[(segmentation node, day), ...], not both and not neither.")

    _check_progress_and_cancel(progress, cancel, 0.0)
    _ensure_segmentation_converters()
    baseline_volume = _read_baseline(segmentation_node, reference_volume_node, class_map, schema, scene)[0]
    if history is not None:
        measured_days, measured_ml = _history_tumour_volumes(scene, history, segmentation_node,
                                                             reference_volume_node, class_map, schema)
    else:
        try:
            measured_days, measured_ml = volumes
        except (TypeError, ValueError):
            raise InputError("volumes must be (days, volumes_ml): two sequences of the same length.") from None
    _check_progress_and_cancel(progress, cancel, _PROGRESS_READ)
    geometry, shape = baseline_volume.geometry, tuple(baseline_volume.labels.shape)
    treatment = load_plan(plan, schema=schema)
    loaded = treatment.with_loaded_arrays(_plan_file_loader(geometry, shape), grid_shape=shape)
    fit = fit_burden(measured_days, measured_ml, schedule_from_plan(treatment))
    boot = bootstrap_burden(fit, bootstrap, seed=seed)
    targets = boot.volume_quantiles(plan_day, int(members))  # stratified draws, as guided_ensemble does
    if baseline_day:
        loaded = shift_plan(loaded, baseline_day)
    model = parameters if isinstance(parameters, PDEParameters) else PDEParameters.load(parameters, schema)
    state = AnatomyState.from_labelmap(baseline_volume)
    _check_progress_and_cancel(progress, cancel, 0.1)

    def on_members(done: int, total: int) -> None:
        if progress is not None:
            progress(0.1 + 0.8 * float(done) / max(int(total), 1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GuidedForecastWarning)
        ensemble = guided_ensemble(state.field, geometry.spacing_array_order, day, targets, plan=loaded, model=model,
                                   schema=schema, progress=on_members, cancel=cancel)
    notes = [str(w.message) for w in caught if issubclass(w.category, GuidedForecastWarning)]
    for w in caught:
        if not issubclass(w.category, GuidedForecastWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seg_ml = float((baseline_volume.labels == schema.tumour_index).sum()) * geometry.voxel_volume_ml
    v0 = float(np.atleast_1d(fit.predict([baseline_day]))[0])
    if seg_ml > 0 and abs(seg_ml - v0) > 0.1 * max(seg_ml, v0):
        notes.append(f"The segmentation's tumour volume ({seg_ml:.2f} mL) and the burden fit on the baseline day "
                     f"{baseline_day:g} ({v0:.2f} mL) "
                     "differ by more than 10 %; the members' volumes are the burden forecast's (check that the "
                     "measured volumes are of the same tumour region as the segmentation).")
    notes += list(fit.notes)
    _check_progress_and_cancel(progress, cancel, 0.9)

    band = boot.band([plan_day])
    probability = ensemble.probability
    voxel_ml = geometry.voxel_volume_ml
    fitted = fit.predict(fit.days)
    rows: list[list] = []
    for d, measured, model_ml in zip(fit.days.tolist(), fit.volumes_ml.tolist(), np.atleast_1d(fitted).tolist()):
        rows.append([f"tumour volume on day {d:g}", measured, "mL", f"measured; burden fit {model_ml:.3g} mL"])
    for name in PARAMETER_NAMES:
        if name == "rt_survival" and not fit.schedule.has_rt:
            continue
        if name == "surgery_residual" and not fit.schedule.has_surgery:
            continue
        if name in ("clearance_half_life_days", "death_delay_days") and not fit.schedule.has_rt:
            continue
        rows.append([name, float(getattr(fit.parameters, name)), UNITS[name],
                     f"{fit.sources[name]}; {DESCRIPTIONS[name]}"])
    rows.append(["R²", fit.r2, "", f"burden fit over {fit.days.size} volumes, {len(fit.free)} free parameters"])
    rows.append(["RMSE", fit.rmse_ml, "mL", "burden fit"])
    after = f"{day:g} days after the baseline scan"
    rows.append([f"forecast on day {plan_day:g}: fit", float(band["fit"][0]), "mL", f"burden model; {after}"])
    rows.append([f"forecast on day {plan_day:g}: median", float(band["median"][0]), "mL",
                 f"{boot.size} bootstrap members; {after}"])
    rows.append([f"forecast on day {plan_day:g}: 5 %", float(band["lower"][0]), "mL", "lower end of the 90 % band"])
    rows.append([f"forecast on day {plan_day:g}: 95 %", float(band["upper"][0]), "mL", "upper end of the 90 % band"])
    rows.append(["members", int(ensemble.targets_ml.size), "", "guided PDE forecasts in the map"])
    rows.append(["members within tolerance", int(ensemble.within_tolerance.sum()), "", "volume met within tolerance"])
    rows.append(["members clamped", int(ensemble.clamped.sum()), "", "target volume out of the PDE's reach"])
    rows.append(["PDE runs", ensemble.pde_runs, "", "forecasts computed for the map"])
    rows.append(["map volume p >= 0.5", float((probability >= 0.5).sum()) * voxel_ml, "mL",
                 "tumour in half the members"])
    rows.append(["map volume p > 0", float((probability > 0).sum()) * voxel_ml, "mL", "tumour in any member"])
    rows.append(["map volume p >= 0.95", float((probability >= 0.95).sum()) * voxel_ml, "mL",
                 "tumour in 95 % of members"])
    summary_text = (f"+{day:g} d: burden forecast {float(band['median'][0]):.1f} mL (90 % band "
                    f"{float(band['lower'][0]):.1f}-{float(band['upper'][0]):.1f} mL), R² {fit.r2:.3f}; "
                    f"{ensemble.summary()}")

    run_id = secrets.token_hex(6)
    base = output_name or segmentation_node.GetName() or "segmentation"
    plan_text = plan_summary(treatment)

    def build(result: dict, created: list) -> None:
        mark = _marker(created, segmentation_node, reference_volume_node, run_id, "pde-guided", _KIND_PROBABILITY_MAP)
        parent_item = _study_item_of(scene, reference_volume_node)
        lut, lut_created = _probability_lut(scene)
        if lut_created:
            created.append(lut)
            result["color_table"] = lut
        node = mark(_probability_volume(scene, _unique_name(scene, f"{base} growth probability +{_format_day(day)} d",
                                                            replace), probability, geometry, lut),
                    "growth_probability", day)
        _place_in_hierarchy(scene, node, parent_item)
        result["probability_map"] = node
        _check_progress_and_cancel(progress, cancel, 0.95)
        report = mark(_table_node(scene, _unique_name(scene, f"{base} growth probability report", replace),
                                  _PARAMETER_COLUMNS, rows), "growth_probability_report", day)
        report.SetAttribute(_ATTR_PLAN, plan_text)
        report.SetAttribute(_ATTR_NOTES, "\n".join(notes))
        report.SetAttribute(_ATTR_SUMMARY, summary_text)
        _place_in_hierarchy(scene, report, parent_item)
        result["report"] = report

    result = _add_outputs(scene, reference_volume_node, segmentation_node, build, lambda r: r["probability_map"],
                          run_id=run_id, replace=replace, kind=_KIND_PROBABILITY_MAP, progress=progress,
                          cancel=cancel)
    for note in notes:
        logger.info("AnatomyDT: %s", note)
    return result


def remove_outputs(scene, result: Mapping[str, Any]) -> None:
    """Remove the nodes of a :func:`predict_into_scene`, :func:`calibrate_into_scene` or
    :func:`probability_map_into_scene` result (with their display and storage nodes); the shared
    colour table stays. For callers that chain runs and must undo an earlier one."""
    _remove_nodes(scene, [n for n in created_nodes(result)
                          if not n.IsA("vtkMRMLColorTableNode") and n.GetScene() is scene])


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_segmentation(segmentation_node, path, *, force: bool = False) -> Path:
    """Write a segmentation node to ``.seg.nrrd`` with Slicer's storage node, atomically.

    Segment names, colours, label values, terminology and tags are kept (3D Slicer, slicerio and
    ``anatomydt`` read it). The node itself is not changed. Raises
    :class:`~AnatomyDTLib.errors.OutputExistsError` if ``path`` exists and ``force`` is False.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("Select a segmentation node to export.")
    if not str(path).lower().endswith(".seg.nrrd"):
        raise InputError(f"'{path}': segmentations are exported as .seg.nrrd; use export_labelmap_nifti for NIfTI.")
    with atomic_output(path, force) as tmp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp))
        storage.SetUseCompression(True)
        if not storage.WriteData(segmentation_node):
            raise InputError(f"Could not write '{path}' (Slicer's segmentation storage node failed).")
    return Path(path)


def export_labelmap_nifti(segmentation_node, reference_volume_node, path, *, force: bool = False,
                          class_map: Mapping[Any, Any] | None = None, schema: ClassSchema = DEFAULT_SCHEMA) -> Path:
    """Write a segmentation as a class-index labelmap (0 background, 1 tumour, ...) on the reference
    grid, as NIfTI (``.nii.gz``/``.nii``; ``.nrrd`` also works) with exact LPS geometry, atomically.

    Segments are mapped to classes exactly as for prediction (:func:`read_baseline`), so predicted
    nodes (segment names = class names) need no class map.
    """
    file_extension(path, (".nii.gz", ".nii", ".nrrd"))  # refuses other formats before any work
    volume = read_baseline(segmentation_node, reference_volume_node, class_map=class_map, schema=schema)
    return write_labelmap(path, volume.labels, volume.geometry, schema, force=force)

