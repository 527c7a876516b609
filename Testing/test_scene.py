"""The qt-free Slicer scene logic (AnatomyDTLib.scene) on a real vtkMRMLScene from the slicer-core wheel.

Inputs are built the way a Slicer user gets them: a FLAIR scalar volume with an oblique-free but
flipped, anisotropic IJK-to-RAS matrix, and a segmentation imported from a labelmap with segment
names such as "Tumor" and "Cortex". Outputs are checked against a direct call of
``AnatomyDTLib.predict.predict`` on the same labelmap and geometry, read back with slicerio, and
the input nodes are checked to be unchanged.

When ``Resources/SampleData/sample_flair.nii.gz`` and a sample segmentation exist, the case is
the sample (subsampled to at most ~40 voxels per axis to keep the suite fast); otherwise a small
synthetic case with all five classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("'slicer' is not 3D Slicer's Python (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import SimpleITK as sitk  # noqa: E402
import slicerio  # noqa: E402

from AnatomyDTLib import scene as scene_logic  # noqa: E402
from AnatomyDTLib.errors import Cancelled, InputError, OutputExistsError  # noqa: E402
from AnatomyDTLib.io import Geometry, LabelVolume, read_labelmap  # noqa: E402
from AnatomyDTLib.predict import predict  # noqa: E402
from AnatomyDTLib.schema import BRAIN_SCHEMA  # noqa: E402
from AnatomyDTLib.state import AnatomyState  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "Resources" / "SampleData"
DAYS = [30, 90]
# What a user's segment names look like; the logic must map them to the schema's classes.
USER_NAMES = {1: "Tumor", 2: "White matter", 3: "Cortex", 4: "Ventricles"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TEST_TERMINOLOGY = ("Test context~99TEST^1^Morphologically altered structure~99TEST^2^Neoplasm~^^~"
                    "Test anatomy~^^~^^")  # private "99" coding scheme: test data, not a real code


# --------------------------------------------------------------------------------------------
# Building the input scene
# --------------------------------------------------------------------------------------------


def synthetic_case():
    """Labels (k, j, i) with all five classes, a FLAIR-like image and an IJK-to-RAS matrix."""
    shape = (14, 18, 16)
    kk, jj, ii = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt((kk / 6.0) ** 2 + (jj / 8.0) ** 2 + (ii / 7.0) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r <= 1.0] = 3
    labels[r <= 0.72] = 2
    labels[(np.abs(kk) <= 1) & (np.abs(jj) <= 3) & (np.abs(ii - 2) <= 1)] = 4
    labels[((kk - 1.5) ** 2 + (jj + 2.5) ** 2 + (ii + 2.5) ** 2) <= 5.0] = 1
    flair = np.choose(labels, [0.0, 1.1, 0.55, 0.75, 0.08]).astype(np.float32)
    # Flipped i axis, anisotropic voxels, non-zero origin: exercises RAS <-> LPS.
    ijk_to_ras = np.array([[-1.2, 0.0, 0.0, 40.0],
                           [0.0, 1.1, 0.0, -12.0],
                           [0.0, 0.0, 2.0, 7.5],
                           [0.0, 0.0, 0.0, 1.0]])
    return labels, flair, ijk_to_ras


def sample_case():
    """The bundled sample (subsampled), or None when it is not there yet."""
    flair_path = SAMPLE_DIR / "sample_flair.nii.gz"
    if not flair_path.is_file():
        return None
    seg_path = SAMPLE_DIR / "sample_baseline.seg.nrrd"
    if not seg_path.is_file():
        return None
    volume = read_labelmap(seg_path)
    image = sitk.ReadImage(str(flair_path))
    flair = sitk.GetArrayFromImage(image).astype(np.float32)
    geometry = Geometry.from_sitk(image)
    if flair.shape != volume.labels.shape or not geometry.matches(volume.geometry) or volume.labels.ndim != 3:
        return None
    step = max(1, int(np.ceil(max(flair.shape) / 40)))
    labels, flair = volume.labels[::step, ::step, ::step], flair[::step, ::step, ::step]
    if not (labels == BRAIN_SCHEMA.tumour_index).any():
        return None
    sub = Geometry(tuple(s * step for s in geometry.spacing), geometry.origin, geometry.direction)
    return labels.astype(np.uint8), flair, LPS_FROM_RAS @ sub.ijk_to_lps()


def _matrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _add_volume(scene, array, ijk_to_ras, name, node_class="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def _ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _import_segmentation(scene, labels, ijk_to_ras, reference, name="Baseline", names=USER_NAMES):
    """A segmentation node as a user would have it: imported from a labelmap, segments renamed."""
    label_node = _add_volume(scene, labels, ijk_to_ras, "tmp labels", "vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, seg)
    segmentation = seg.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName(names[segment.GetLabelValue()])
    display = label_node.GetDisplayNode()
    scene.RemoveNode(label_node)
    if display is not None and display.GetScene() is scene:
        scene.RemoveNode(display)
    return seg


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _new_nodes(scene, before):
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()) if scene.GetNthNode(i).GetID() not in before]


def _segment_array(seg, segment_id, reference):
    """A segment on the reference grid, as Slicer exports it (k, j, i)."""
    scene = seg.GetScene()
    before = _node_ids(scene)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, label, reference)
    array = slicer.util.arrayFromVolume(label).copy()
    for node in _new_nodes(scene, before):
        scene.RemoveNode(node)
    return array != 0


def _input_fingerprint(seg, flair):
    """Bytes of every input voxel array plus segment names, colours and the nodes' MTimes."""
    segmentation = seg.GetSegmentation()
    parts = [slicer.util.arrayFromVolume(flair).tobytes(), _ras(flair).tobytes()]
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        rep = segment.GetRepresentation("Binary labelmap")
        parts.append(numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()).tobytes())
        parts.append(repr((segment.GetName(), segment.GetColor(), segment.GetLabelValue(), rep.GetExtent())).encode())
    return b"".join(parts), seg.GetMTime(), flair.GetMTime(), segmentation.GetMTime()


class Case:
    def __init__(self):
        case = sample_case()
        self.is_sample = case is not None
        self.labels, self.flair_array, self.ijk_to_ras = case if case is not None else synthetic_case()
        self.scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = self.scene
        scene = self.scene
        self.flair = _add_volume(scene, self.flair_array, self.ijk_to_ras, "FLAIR")
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
        self.study = sh.CreateStudyItem(patient, "Baseline MRI")
        sh.CreateItem(self.study, self.flair)
        self.seg = _import_segmentation(scene, self.labels, self.ijk_to_ras, self.flair)
        sh.CreateItem(self.study, self.seg)
        self.composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # stands for a slice view
        self.geometry = Geometry.from_ijk_to_lps(LPS_FROM_RAS @ self.ijk_to_ras)

    def expected_prediction(self, days=DAYS):
        """``predict()`` called directly on the same labelmap and geometry (cached: every Case is the same)."""
        key = tuple(float(d) for d in np.atleast_1d(days))
        if key not in _EXPECTED:
            state = AnatomyState.from_labelmap(LabelVolume(self.labels, self.geometry, BRAIN_SCHEMA))
            _EXPECTED[key] = predict(state, days=list(key), model="pde-only")
        return _EXPECTED[key]


_EXPECTED: dict = {}


@pytest.fixture(scope="module")
def run():
    """One end-to-end run on days [30, 90], shared by the assertions below."""
    case = Case()
    before_ids = _node_ids(case.scene)
    fingerprint = _input_fingerprint(case.seg, case.flair)
    fractions = []
    result = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=DAYS, model="pde-only",
                                            progress=fractions.append, cancel=lambda: False)
    return case, result, before_ids, fingerprint, fractions


# --------------------------------------------------------------------------------------------
# End-to-end run
# --------------------------------------------------------------------------------------------


def test_created_nodes_are_exactly_the_returned_ones(run):
    case, result, before_ids, _, fractions = run
    new = _new_nodes(case.scene, before_ids)
    returned = scene_logic.created_nodes(result)
    assert {n.GetID() for n in returned} <= {n.GetID() for n in new}
    data_nodes = [n for n in new if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
    assert sorted(n.GetID() for n in data_nodes) == sorted(n.GetID() for n in returned)
    counts = {}
    for node in data_nodes:
        counts[node.GetClassName()] = counts.get(node.GetClassName(), 0) + 1
    assert counts == {
        "vtkMRMLSegmentationNode": 3,  # two days + the sequence proxy
        "vtkMRMLScalarVolumeNode": 3,  # two probability maps + the proxy
        "vtkMRMLSequenceNode": 2,
        "vtkMRMLSequenceBrowserNode": 1,
        "vtkMRMLTableNode": 1,
        "vtkMRMLPlotChartNode": 1,
        "vtkMRMLPlotSeriesNode": 4,
        "vtkMRMLColorTableNode": 1,
    }
    assert [n.GetName() for n in result["segmentations"]] == ["Baseline +30 d", "Baseline +90 d"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))


def test_segments_names_colours_tags_and_terminology(run):
    case, result, *_ = run
    tags = case.expected_prediction().segment_tags()
    for seg in result["segmentations"]:
        segmentation = seg.GetSegmentation()
        assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == \
            list(BRAIN_SCHEMA.names[1:])
        for k, name in enumerate(BRAIN_SCHEMA.names[1:], start=1):
            segment = segmentation.GetSegment(name)
            assert segment.GetName() == name
            assert np.allclose(segment.GetColor(), BRAIN_SCHEMA.colors[k])
            assert segment.GetLabelValue() == k
            assert segment.GetTerminology() == BRAIN_SCHEMA.terminology[name]  # SNOMED CT coded
            for key, value in tags.items():
                holder = vtk.mutable("")
                assert segment.GetTag(key, holder)
                assert str(holder) == value
        assert segmentation.GetNumberOfLayers() == 1
        assert segmentation.ContainsRepresentation("Closed surface")
        assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == case.flair.GetID()
    assert tags["DICOM.SegmentAlgorithmType"] == "AUTOMATIC"


def test_output_geometry_equals_reference(run):
    case, result, *_ = run
    flair_ras = _ras(case.flair)
    ref_geometry = case.flair.GetImageData().GetDimensions()
    for seg in result["segmentations"]:
        rep = seg.GetSegmentation().GetSegment("white_matter").GetRepresentation("Binary labelmap")
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        assert np.allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], flair_ras)
        serialized = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
        grid = slicer.vtkOrientedImageData()
        assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, grid, False)
        grid.GetImageToWorldMatrix(m)
        assert np.allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], flair_ras)
        assert grid.GetDimensions() == ref_geometry
    for prob in result["tumour_probability"]:
        assert np.allclose(_ras(prob), flair_ras)
        assert prob.GetImageData().GetDimensions() == ref_geometry


def test_voxels_equal_a_direct_predict_call(run):
    case, result, *_ = run
    expected = case.expected_prediction()
    for i, seg in enumerate(result["segmentations"]):
        labels = expected.labels(i)
        for k, name in enumerate(BRAIN_SCHEMA.names[1:], start=1):
            mask = _segment_array(seg, name, case.flair)
            assert mask.sum() == (labels == k).sum(), (DAYS[i], name)
            assert np.array_equal(mask, labels == k)
        prob = slicer.util.arrayFromVolume(result["tumour_probability"][i])
        assert np.allclose(prob, expected.tumour_probability(i), atol=1e-6)
    assert (expected.labels(1) == 1).sum() > 0


def test_volume_table_is_voxel_count_times_voxel_volume(run):
    case, result, *_ = run
    table = result["table"].GetTable()
    voxel_ml = abs(np.linalg.det(case.ijk_to_ras[:3, :3])) / 1000.0
    expected = case.expected_prediction()
    rows = [case.labels] + [expected.labels(i) for i in range(len(DAYS))]
    assert table.GetNumberOfRows() == len(rows)
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == ["day"] + list(BRAIN_SCHEMA.names[1:])
    for r, labels in enumerate(rows):
        assert table.GetValue(r, 0).ToDouble() == ([0.0] + [float(d) for d in DAYS])[r]
        for c, name in enumerate(BRAIN_SCHEMA.names[1:], start=1):
            count = int((labels == BRAIN_SCHEMA.index(name)).sum())
            assert table.GetValue(r, c).ToDouble() == pytest.approx(count * voxel_ml, rel=1e-9, abs=1e-12)
    chart = result["plot_chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 4
    assert {s.GetYColumnName() for s in result["plot_series"]} == set(BRAIN_SCHEMA.names[1:])


def test_sequence_has_one_item_per_day_and_plays(run):
    case, result, *_ = run
    for key in ("sequence", "probability_sequence"):
        sequence = result[key]
        assert sequence.GetNumberOfDataNodes() == len(DAYS)
        assert [sequence.GetNthIndexValue(i) for i in range(len(DAYS))] == ["30", "90"]
        assert sequence.GetIndexUnit() == "day"
    browser = result["sequence_browser"]
    assert browser.GetMasterSequenceNode().GetID() == result["sequence"].GetID()
    assert browser.IsSynchronizedSequenceNodeID(result["probability_sequence"].GetID())
    item = result["sequence"].GetNthDataNode(1)
    assert item.GetSegmentation().GetSegment("tumour").GetName() == "tumour"


def test_subject_hierarchy_and_overlay(run):
    case, result, *_ = run
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(case.scene)
    for node in result["segmentations"] + result["tumour_probability"] + [result["table"]]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == case.study
    assert case.composite.GetBackgroundVolumeID() == case.flair.GetID()
    assert case.composite.GetForegroundVolumeID() == result["probability_proxy"].GetID()
    display = result["tumour_probability"][0].GetDisplayNode()
    assert display.GetColorNodeID() == result["color_table"].GetID()
    assert display.GetApplyThreshold()


def test_inputs_are_unchanged(run):
    case, _, _, fingerprint, _ = run
    assert _input_fingerprint(case.seg, case.flair) == fingerprint


def test_seg_nrrd_export_reads_back_with_slicerio(run, tmp_path):
    case, result, *_ = run
    seg = result["segmentations"][1]
    path = scene_logic.export_segmentation(seg, tmp_path / "pred90.seg.nrrd")
    with pytest.raises(OutputExistsError):
        scene_logic.export_segmentation(seg, path)
    data = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in data["segments"]]
    assert names == list(BRAIN_SCHEMA.names[1:])
    tags = case.expected_prediction().segment_tags()
    for s in data["segments"]:
        k = BRAIN_SCHEMA.index(s["name"])
        assert np.allclose(s["color"], BRAIN_SCHEMA.colors[k], atol=1e-4)
        for key, value in tags.items():
            assert s["tags"][key] == value
    voxels = np.asarray(data["voxels"])
    if voxels.ndim == 4:
        voxels = voxels[0]
    ijk_to_lps = np.asarray(data["ijkToLPS"])
    flair_lps = LPS_FROM_RAS @ _ras(case.flair)
    # The file may hold a sub-extent: find its offset on the FLAIR grid, then compare voxels.
    offset = np.linalg.solve(flair_lps[:3, :3], ijk_to_lps[:3, 3] - flair_lps[:3, 3])
    assert np.allclose(offset, np.round(offset), atol=1e-4)
    assert np.allclose(ijk_to_lps[:3, :3], flair_lps[:3, :3])
    o = np.round(offset).astype(int)
    full = np.zeros(case.labels.shape[::-1], dtype=np.int64)  # (i, j, k)
    full[o[0]:o[0] + voxels.shape[0], o[1]:o[1] + voxels.shape[1], o[2]:o[2] + voxels.shape[2]] = voxels
    values = {s["name"]: s["labelValue"] for s in data["segments"]}
    got = np.zeros_like(full)
    for name, value in values.items():
        got[full == value] = BRAIN_SCHEMA.index(name)
    assert np.array_equal(got.transpose(2, 1, 0), case.expected_prediction().labels(1))
    # And the library reads it back to the same labels and geometry.
    back = read_labelmap(path)
    expected = case.expected_prediction().labels(1)
    for name, count in back.class_voxel_counts().items():
        if name != "background":
            assert count == int((expected == BRAIN_SCHEMA.index(name)).sum())


def test_nifti_export_has_labels_and_geometry(run, tmp_path):
    case, result, *_ = run
    path = scene_logic.export_labelmap_nifti(result["segmentations"][0], case.flair, tmp_path / "pred30.nii.gz")
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), case.expected_prediction().labels(0))
    assert Geometry.from_sitk(image).matches(case.geometry)
    with pytest.raises(OutputExistsError):
        scene_logic.export_labelmap_nifti(result["segmentations"][0], case.flair, path)


# --------------------------------------------------------------------------------------------
# Cancel, replace, single day
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_at", [0.3, 0.9])
def test_cancel_leaves_no_new_nodes(cancel_at):
    """Cancelled during the model run (0.3) or while output nodes are being built (0.9)."""
    case = Case()
    before = _node_ids(case.scene)
    background, foreground = case.composite.GetBackgroundVolumeID(), case.composite.GetForegroundVolumeID()
    seen = []

    def cancel():
        return bool(seen) and seen[-1] >= cancel_at

    with pytest.raises(Cancelled):
        scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[4, 8], model="pde-only",
                                       progress=seen.append, cancel=cancel)
    assert _node_ids(case.scene) == before
    assert (case.composite.GetBackgroundVolumeID(), case.composite.GetForegroundVolumeID()) == (background, foreground)
    assert max(seen) >= cancel_at


def test_single_day_replace_and_rerun():
    case = Case()
    first = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=6, model="pde-only",
                                           create_surfaces=False)
    assert "sequence" not in first and len(first["segmentations"]) == 1
    assert not first["segmentations"][0].GetSegmentation().ContainsRepresentation("Closed surface")  # none asked for
    assert case.composite.GetForegroundVolumeID() == first["tumour_probability"][0].GetID()
    second = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[6], model="pde-only",
                                            create_surfaces=False)
    assert second["segmentations"][0].GetName() != first["segmentations"][0].GetName()  # re-run: new nodes
    assert first["segmentations"][0].GetScene() is case.scene
    third = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[6], model="pde-only",
                                           create_surfaces=False, replace=True)
    for node in scene_logic.created_nodes(first) + scene_logic.created_nodes(second):
        if node.IsA("vtkMRMLColorTableNode"):
            assert node.GetScene() is case.scene  # shared colour table stays
        else:
            assert node.GetScene() is None
    assert third["segmentations"][0].GetName() == "Baseline +6 d"


# --------------------------------------------------------------------------------------------
# Class mapping, treatment inputs from nodes
# --------------------------------------------------------------------------------------------


def test_segment_classes_by_name_terminology_and_class_map():
    case = Case()
    segmentation = case.seg.GetSegmentation()
    tumour = segmentation.GetNthSegment(0)
    assert tumour.GetName() == "Tumor"
    tumour.SetName("Lesion A")
    tumour.SetTerminology(TEST_TERMINOLOGY)
    mapping = {m.name: m for m in scene_logic.segment_classes(case.seg)}
    assert mapping["Lesion A"].class_name == "tumour"  # "lesion" is a tumour synonym
    tumour.SetName("Blob")
    mapping = {m.name: m for m in scene_logic.segment_classes(case.seg)}
    assert (mapping["Blob"].class_name, mapping["Blob"].source) == ("tumour", "terminology")
    assert (mapping["Cortex"].class_name, mapping["Ventricles"].class_name) == ("grey_matter", "lateral_ventricles")
    mapping = {m.name: m for m in scene_logic.segment_classes(case.seg, {"cortex": "ignore", "Blob": "tumour"})}
    assert mapping["Cortex"].class_name is None and mapping["Cortex"].source == "ignored"
    assert mapping["Blob"].source == "class map"
    result = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[3], model="pde-only",
                                            create_surfaces=False)
    # The user's own terminology for the tumour is kept on the predicted tumour segment.
    assert result["segmentations"][0].GetSegmentation().GetSegment("tumour").GetTerminology() == TEST_TERMINOLOGY


def test_unmatched_segment_and_bad_class_map_are_input_errors():
    case = Case()
    case.seg.GetSegmentation().GetNthSegment(1).SetName("Label_2")
    with pytest.raises(InputError, match="match no class"):
        scene_logic.read_baseline(case.seg, case.flair)
    with pytest.raises(InputError, match="not a class"):
        scene_logic.read_baseline(case.seg, case.flair, class_map={"Label_2": "bone"})
    volume = scene_logic.read_baseline(case.seg, case.flair, class_map={"Label_2": "white_matter"})
    assert np.array_equal(volume.labels, case.labels)
    assert volume.geometry.matches(case.geometry)


def test_treatment_from_nodes_changes_the_prediction():
    case = Case()
    mask = scene_logic.resection_mask_from_segment(case.seg, case.seg.GetSegmentation().GetNthSegmentID(0), case.flair)
    assert np.array_equal(mask, case.labels == 1)
    # A dose volume on a coarser, shifted grid: resampled onto the FLAIR grid.
    dose_ras = case.ijk_to_ras.copy()
    dose_ras[:3, :3] *= 2.0
    dose_ras[:3, 3] -= dose_ras[:3, :3] @ np.array([1.0, 1.0, 1.0])  # one coarse voxel of margin
    coarse_shape = tuple(n // 2 + 3 for n in case.labels.shape)
    dose_node = _add_volume(case.scene, np.full(coarse_shape, 60.0, np.float32), dose_ras, "Dose")
    dose = scene_logic.dose_array_from_volume(dose_node, case.flair)
    assert dose.shape == case.labels.shape
    assert np.allclose(dose[case.labels == 1], 60.0)
    plan = {"surgery": [{"day": 2, "extent": 0.5}],
            "radiotherapy": {"start_day": 3, "fractions": 5, "total_dose_gy": 10, "dose_map": dose}}
    treated = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[10], plan=plan, model="pde-only",
                                             create_surfaces=False)
    untreated = case.expected_prediction(days=[10])
    tumour_treated = _segment_array(treated["segmentations"][0], "tumour", case.flair).sum()
    assert tumour_treated < (untreated.labels(0) == 1).sum()
    masked = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[3], model="pde-only",
                                            plan={"surgery": [{"day": 1, "resection_mask": mask}]},
                                            create_surfaces=False)
    assert _segment_array(masked["segmentations"][0], "tumour", case.flair).sum() < (case.labels == 1).sum()
    assert "Surgery on day 2" in treated["table"].GetAttribute("AnatomyDT.PlanSummary")


def test_the_bundled_default_model_predicts_into_the_scene(tmp_path):
    case = Case()
    result = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[30], create_surfaces=False)
    assert len(result["segmentations"]) == 1
    segmentation = result["segmentations"][0].GetSegmentation()
    assert segmentation.GetSegment("tumour") is not None
    holder = vtk.mutable("")
    assert segmentation.GetSegment("tumour").GetTag("DICOM.SegmentAlgorithmName", holder)
    assert "anatomy-dt-learned" in str(holder)


def test_unreadable_weights_are_a_clear_input_error_and_leave_no_nodes(tmp_path):
    case = Case()
    before = _node_ids(case.scene)
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not weights")
    with pytest.raises(InputError, match="corrupt"):
        scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[30], model=str(bad))
    assert _node_ids(case.scene) == before


def test_missing_classes_and_completion_flag():
    case = Case()
    volume = scene_logic.read_baseline(case.seg, case.flair)
    assert scene_logic.missing_classes(volume) == []
    assert scene_logic.missing_classes(np.where(volume.labels == 4, 0, volume.labels)) == ["lateral_ventricles"]
    assert isinstance(scene_logic.completion_available(), bool)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_no_tumour_segment_is_an_input_error():
    case = Case()
    segmentation = case.seg.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetNthSegmentID(0))  # the tumour
    before = _node_ids(case.scene)
    with pytest.raises(InputError, match="no tumour segment"):
        scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[30], model="pde-only")
    assert _node_ids(case.scene) == before


def test_reference_on_a_different_grid_is_an_input_error():
    case = Case()
    other_ras = case.ijk_to_ras.copy()
    other_ras[:3, :3] *= 0.5  # half the voxel size: another grid than the segmentation's
    other = _add_volume(case.scene, np.zeros(tuple(2 * n for n in case.labels.shape), np.float32), other_ras, "T1")
    with pytest.raises(InputError, match="different grid"):
        scene_logic.predict_into_scene(case.scene, case.seg, other, days=[30], model="pde-only")


def test_segmentation_outside_the_reference_is_an_input_error():
    case = Case()
    far_ras = case.ijk_to_ras.copy()
    far_ras[:3, 3] += far_ras[:3, :3] @ np.array([200.0, 0.0, 0.0])  # same lattice, 200 voxels away
    far = _add_volume(case.scene, np.zeros(case.labels.shape, np.float32), far_ras, "Far FLAIR")
    with pytest.raises(InputError, match="entirely outside"):
        scene_logic.predict_into_scene(case.scene, case.seg, far, days=[30], model="pde-only")


def test_2d_reference_volume_is_an_input_error():
    case = Case()
    flat = _add_volume(case.scene, np.zeros((1,) + case.labels.shape[1:], np.float32), case.ijk_to_ras, "Slice")
    with pytest.raises(InputError, match="2D"):
        scene_logic.predict_into_scene(case.scene, case.seg, flat, days=[30], model="pde-only")


def test_plan_json_file_is_accepted(tmp_path):
    case = Case()
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"version": 1, "chemotherapy": [
        {"agent": "temozolomide", "kill_rate_per_day": 0.05, "windows": [[0, 5]]}]}))
    result = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[5], plan=str(plan_path),
                                            model="pde-only", create_surfaces=False)
    assert "TMZ" in result["table"].GetAttribute("AnatomyDT.PlanSummary")


# --------------------------------------------------------------------------------------------
# Panel helpers
# --------------------------------------------------------------------------------------------


def test_stupp_preset_is_the_stupp_plan_and_none_is_no_treatment():
    from AnatomyDTLib.plan import load_plan, no_treatment_plan, stupp_plan

    assert load_plan(scene_logic.panel_plan(**scene_logic.STUPP_PRESET)) == stupp_plan(28)
    assert load_plan(scene_logic.panel_plan(**scene_logic.NO_TREATMENT_PRESET)) == no_treatment_plan()
    plan = load_plan(scene_logic.panel_plan(surgery_enabled=True, surgery_day=5, surgery_extent=0.9))
    assert plan.surgeries[0].extent == 0.9
    with pytest.raises(InputError, match="resection segment"):
        scene_logic.panel_plan(surgery_enabled=True)


def test_time_points_in_days_and_weeks():
    assert scene_logic.time_points(90, "days", "30, 60") == [30.0, 60.0, 90.0]
    assert scene_logic.time_points(12, "weeks", "4;8 8") == [28.0, 56.0, 84.0]
    assert scene_logic.time_points(30, "days", [30]) == [30.0]
    with pytest.raises(InputError, match="between 0 and the horizon"):
        scene_logic.time_points(30, "days", "45")
    with pytest.raises(InputError, match="numbers"):
        scene_logic.time_points(30, "days", "ten")


def test_complete_anatomy_fills_only_missing_classes():
    if not scene_logic.completion_available():
        pytest.skip("AnatomyDTLib.brain.completion is not available")
    case = Case()
    segmentation = case.seg.GetSegmentation()
    for segment_id in [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]:
        if segmentation.GetSegment(segment_id).GetName() in ("White matter", "Cortex"):
            segmentation.RemoveSegment(segment_id)
    volume = scene_logic.read_baseline(case.seg, case.flair)
    assert scene_logic.missing_classes(volume) == ["white_matter", "grey_matter"]
    fractions = []
    result = scene_logic.predict_into_scene(case.scene, case.seg, case.flair, days=[2], model="pde-only",
                                            complete_anatomy=True, create_surfaces=False, progress=fractions.append)
    table = result["table"].GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    baseline = {name: table.GetValue(0, c).ToDouble() for c, name in enumerate(columns)}
    voxel_ml = abs(np.linalg.det(case.ijk_to_ras[:3, :3])) / 1000.0
    assert baseline["white_matter"] > 0 and baseline["grey_matter"] > 0
    assert baseline["tumour"] == pytest.approx((case.labels == 1).sum() * voxel_ml)  # labelled voxels are kept
    assert baseline["lateral_ventricles"] == pytest.approx((case.labels == 4).sum() * voxel_ml)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
