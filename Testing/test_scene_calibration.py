"""Calibration on earlier scans and growth-probability maps in the Slicer scene logic.

``AnatomyDTLib.scene.calibrate_into_scene`` and ``probability_map_into_scene`` on a real
vtkMRMLScene from the slicer-core wheel. The history is two segmentation nodes of a small synthetic
brain (the tumour grows between them); outputs are checked against direct calls of the library
(``calibration.calibrate_and_forecast``, ``guided``) on the same labelmaps, read back with slicerio,
and the inputs are checked to be unchanged. Calibrations run 2 iterations on a 14 x 18 x 16 grid.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("'slicer' is not 3D Slicer's Python (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

import slicerio  # noqa: E402

from AnatomyDTLib import scene as scene_logic  # noqa: E402
from AnatomyDTLib.calibration import CalibrationSettings, HistoryScan, calibrate_and_forecast  # noqa: E402
from AnatomyDTLib.errors import Cancelled, InputError, ParameterError  # noqa: E402
from AnatomyDTLib.io import Geometry  # noqa: E402
from AnatomyDTLib.schema import BRAIN_SCHEMA  # noqa: E402
from test_scene import (LPS_FROM_RAS, _add_volume, _import_segmentation, _input_fingerprint,  # noqa: E402
                        _new_nodes, _node_ids, _ras, _segment_array)

SHAPE = (14, 18, 16)
SCAN_DAYS = (0.0, 30.0)
FORECAST_DAYS = [45.0, 60.0]
# Flipped i axis, anisotropic voxels, non-zero origin (as in test_scene).
IJK_TO_RAS = np.array([[-1.2, 0.0, 0.0, 40.0],
                       [0.0, 1.1, 0.0, -12.0],
                       [0.0, 0.0, 2.0, 7.5],
                       [0.0, 0.0, 0.0, 1.0]])


def settings():
    """A short, deterministic fit (2 Adam steps, one torch thread)."""
    return CalibrationSettings(iterations=2, threads=1)


def brain(tumour_r2: float, shape=SHAPE) -> np.ndarray:
    """Brain-schema labels (k, j, i): grey matter shell, white matter, a ventricle, a tumour of squared radius
    ``tumour_r2`` voxels in the white matter (0 = no tumour)."""
    kk, jj, ii = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    scale = np.array(shape, float) / np.array(SHAPE, float)
    r = np.sqrt((kk / (6.0 * scale[0])) ** 2 + (jj / (8.0 * scale[1])) ** 2 + (ii / (7.0 * scale[2])) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r <= 1.0] = 3
    labels[r <= 0.72] = 2
    labels[(np.abs(kk) <= 1) & (np.abs(jj) <= 3) & (np.abs(ii - 2) <= 1)] = 4
    labels[((kk - 1.5) ** 2 + (jj + 2.5) ** 2 + (ii + 2.5) ** 2) <= tumour_r2] = 1
    return labels


EARLY, LATE = brain(2.5), brain(5.0)


class History:
    """A scene with the FLAIR of the last scan (in a study), two segmentation nodes and a slice view."""

    def __init__(self, early=EARLY, late=LATE, early_ras=None, ijk_to_ras=IJK_TO_RAS):
        self.scene = scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
        self.ijk_to_ras = ijk_to_ras
        self.flair = _add_volume(scene, np.choose(late, [0.0, 1.1, 0.55, 0.75, 0.08]).astype(np.float32),
                                 ijk_to_ras, "FLAIR day 30")
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        self.study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Follow-up MRI")
        sh.CreateItem(self.study, self.flair)
        if early_ras is None:
            self.early = _import_segmentation(scene, early, ijk_to_ras, self.flair, name="Scan day 0")
        else:  # drawn on an earlier FLAIR with its own grid
            self.early_flair = _add_volume(scene, np.zeros(early.shape, np.float32), early_ras, "FLAIR day 0")
            self.early = _import_segmentation(scene, early, early_ras, self.early_flair, name="Scan day 0")
        self.late = _import_segmentation(scene, late, ijk_to_ras, self.flair, name="Scan day 30")
        self.composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        self.geometry = Geometry.from_ijk_to_lps(LPS_FROM_RAS @ ijk_to_ras)

    def pairs(self):
        return [(self.early, SCAN_DAYS[0]), (self.late, SCAN_DAYS[1])]

    def fingerprint(self):
        return _input_fingerprint(self.early, self.flair), _input_fingerprint(self.late, self.flair)

    def sequence(self, name="History", unit="day", values=("0", "30")):
        """A sequence node holding copies of both segmentations (index: days)."""
        logic = slicer.vtkSlicerSequencesLogic()
        logic.SetMRMLScene(self.scene)  # registers the sequence node classes
        sequence = self.scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        sequence.SetIndexName("time")
        sequence.SetIndexUnit(unit)
        sequence.SetIndexType(sequence.NumericIndex)
        for node, value in zip((self.early, self.late), values):
            sequence.SetDataNodeAtValue(node, value)
        logic.SetMRMLScene(None)
        return sequence


_DIRECT: dict = {}


def direct_calibration(days=tuple(FORECAST_DAYS)):
    """``calibrate_and_forecast`` on the same labelmaps and geometry, without the scene (cached)."""
    if days not in _DIRECT:
        geometry = Geometry.from_ijk_to_lps(LPS_FROM_RAS @ IJK_TO_RAS)
        scans = [HistoryScan(EARLY, geometry, SCAN_DAYS[0], "Scan day 0"),
                 HistoryScan(LATE, geometry, SCAN_DAYS[1], "Scan day 30")]
        _DIRECT[days] = calibrate_and_forecast(scans, list(days), None, settings=settings())
    return _DIRECT[days]


def table_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, name in enumerate(names):
            value = table.GetValue(r, c)
            row[name] = value.ToString() if table.GetColumn(c).IsA("vtkStringArray") else value.ToDouble()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Calibration from two segmentation nodes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    case = History()
    before = _node_ids(case.scene)
    fingerprint = case.fingerprint()
    fractions = []
    result = scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=FORECAST_DAYS,
                                              settings=settings(), progress=fractions.append, cancel=lambda: False)
    return case, result, before, fingerprint, fractions


def test_calibration_creates_exactly_the_returned_nodes(calibrated):
    case, result, before, _, fractions = calibrated
    new = _new_nodes(case.scene, before)
    data_nodes = [n for n in new if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
    assert sorted(n.GetID() for n in data_nodes) == sorted(n.GetID() for n in scene_logic.created_nodes(result))
    counts = {}
    for node in data_nodes:
        counts[node.GetClassName()] = counts.get(node.GetClassName(), 0) + 1
    assert counts == {
        "vtkMRMLSegmentationNode": 3,  # two forecast days + the sequence proxy
        "vtkMRMLScalarVolumeNode": 3,  # two probability maps + the proxy
        "vtkMRMLSequenceNode": 2,
        "vtkMRMLSequenceBrowserNode": 1,
        "vtkMRMLTableNode": 3,  # volumes, fit on the history, parameters
        "vtkMRMLPlotChartNode": 1,
        "vtkMRMLPlotSeriesNode": 4,
        "vtkMRMLColorTableNode": 1,
    }
    assert [n.GetName() for n in result["segmentations"]] == ["Scan day 30 calibrated day 45",
                                                              "Scan day 30 calibrated day 60"]
    assert result["fit_table"].GetName() == "Scan day 30 calibrated fit on history"
    assert result["parameter_table"].GetName() == "Scan day 30 calibrated parameters"
    for node in scene_logic.created_nodes(result):
        if not node.IsA("vtkMRMLColorTableNode"):
            assert node.GetAttribute("AnatomyDT.RunKind") == "calibration"
            assert node.GetAttribute("AnatomyDT.SourceSegmentationID") == case.late.GetID()
    assert result["fit_table"].GetAttribute("AnatomyDT.HistoryIDs") == f"{case.early.GetID()} {case.late.GetID()}"
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))


def test_calibrated_forecast_equals_a_direct_library_call(calibrated):
    case, result, *_ = calibrated
    calibration, forecast = direct_calibration()
    flair_ras = _ras(case.flair)
    for i, seg in enumerate(result["segmentations"]):
        expected = forecast.labels(i)
        assert seg.GetAttribute("AnatomyDT.Day") == f"{FORECAST_DAYS[i]:g}"
        for k, name in enumerate(BRAIN_SCHEMA.names[1:], start=1):
            assert np.array_equal(_segment_array(seg, name, case.flair), expected == k), (FORECAST_DAYS[i], name)
        segmentation = seg.GetSegmentation()
        assert [segmentation.GetNthSegmentID(j) for j in range(segmentation.GetNumberOfSegments())] == \
            list(BRAIN_SCHEMA.names[1:])
        holder = vtk.mutable("")
        assert segmentation.GetSegment("tumour").GetTag("DICOM.SegmentAlgorithmType", holder)
        assert str(holder) == "AUTOMATIC"
        assert segmentation.GetSegment("tumour").GetTag("DICOM.SegmentAlgorithmName", holder)
        assert "pde-calibrated" in str(holder)
        assert segmentation.GetSegment("tumour").GetTerminology() == BRAIN_SCHEMA.terminology["tumour"]
        rep = segmentation.GetSegment("tumour").GetRepresentation("Binary labelmap")
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        assert np.allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], flair_ras)
        prob = slicer.util.arrayFromVolume(result["tumour_probability"][i])
        assert np.allclose(prob, forecast.prediction.tumour_probability(i), atol=1e-6)
        assert np.allclose(_ras(result["tumour_probability"][i]), flair_ras)
    assert (forecast.labels(1) == 1).sum() > 0


def test_volume_table_starts_at_the_last_scan_on_the_plan_axis(calibrated):
    case, result, *_ = calibrated
    _, forecast = direct_calibration()
    rows = table_rows(result["table"])
    assert [r["day"] for r in rows] == [SCAN_DAYS[-1]] + FORECAST_DAYS
    voxel_ml = case.geometry.voxel_volume_ml
    assert rows[0]["tumour"] == pytest.approx((LATE == 1).sum() * voxel_ml)
    for row, (day, volumes) in zip(rows, forecast.volumes_ml()):
        assert row["day"] == day
        for name in BRAIN_SCHEMA.names[1:]:
            assert row[name] == pytest.approx(volumes[name])
    sequence = result["sequence"]
    assert [sequence.GetNthIndexValue(i) for i in range(sequence.GetNumberOfDataNodes())] == ["45", "60"]


def test_fit_and_parameter_tables(calibrated):
    case, result, *_ = calibrated
    calibration, _ = direct_calibration()
    fit_rows = table_rows(result["fit_table"])
    assert len(fit_rows) == 1 == len(calibration.fits)
    row, fit = fit_rows[0], calibration.fits[0]
    assert row["scan"] == "Scan day 30" and row["day"] == 30.0
    voxel_ml = case.geometry.voxel_volume_ml
    assert row["measured_tumour_ml"] == pytest.approx((LATE == 1).sum() * voxel_ml)
    assert row["fitted_tumour_ml"] == pytest.approx(fit.fitted_tumour_ml)
    assert row["volume_error_ml"] == pytest.approx(fit.fitted_tumour_ml - row["measured_tumour_ml"])
    assert row["tumour_dice"] == pytest.approx(fit.tumour_dice) and 0.0 <= row["tumour_dice"] <= 1.0
    assert row["tumour_dice_at_start"] == pytest.approx(fit.initial_tumour_dice)
    table = result["fit_table"]
    assert table.GetColumnUnitLabel("measured_tumour_ml") == "mL"
    parameters = {r["name"]: r for r in table_rows(result["parameter_table"])}
    alpha = parameters["tumour growth rate"]
    assert alpha["unit"] == "1/day" and alpha["value"] == pytest.approx(calibration.parameters.growth_rate)
    white = parameters["tumour diffusion in white_matter"]
    assert white["unit"] == "mm²/day"
    assert white["value"] == pytest.approx(calibration.parameters.tumour_diffusion_by_tissue["white_matter"])
    assert parameters["mass effect on white_matter"]["value"] < 0
    assert parameters["iterations"]["value"] == 2
    assert "radiosensitivity factor" not in parameters  # no radiotherapy in the history


def test_parameter_table_names_the_radiotherapy_assumptions():
    """Radiotherapy between the scans: the fitted radiosensitivity and the assumed delayed death and
    hypoxia (neither is in the plan) are listed with their source."""
    case = History()
    plan = {"version": 1, "radiotherapy": {"start_day": 5, "fractions": 10, "total_dose_gy": 20}}
    result = scene_logic.calibrate_into_scene(
        case.scene, case.pairs(), case.flair, days=[45.0], plan=plan,
        settings=CalibrationSettings(iterations=1, threads=1, assumed_delayed_death=(10.0, 20.0),
                                     assumed_hypoxia=2.5))
    parameters = {r["name"]: r for r in table_rows(result["parameter_table"])}
    assert parameters["radiosensitivity factor"]["value"] > 0
    assert parameters["death delay of irradiated cells"]["value"] == 10.0
    assert parameters["clearance half-life"]["value"] == pytest.approx(20.0)
    oer = parameters["oxygen enhancement ratio of dense tumour"]
    assert oer["value"] == 2.5 and oer["note"].startswith("assumed (the plan has none)")
    assert "60-95 %" in oer["note"]


def test_ensemble_adds_probability_volumes_and_a_band_equal_to_the_library_ones():
    """Radiotherapy between the scans, delayed death assumed: ``ensemble_members`` adds one probability
    volume per day (the library's map, read back from the scene) and the volume-band table; a plan
    that states its delayed death is refused before any node is made."""
    from AnatomyDTLib.calibration_ensemble import forecast_ensemble

    plan = {"version": 1, "radiotherapy": {"start_day": 5, "fractions": 10, "total_dose_gy": 20}}
    case = History()
    before = _node_ids(case.scene)
    fingerprint = case.fingerprint()
    result = scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=FORECAST_DAYS, plan=plan,
                                              settings=settings(), ensemble_members=3, ensemble_seed=5)
    assert case.fingerprint() == fingerprint
    new = {n.GetID() for n in _new_nodes(case.scene, before)
           if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")}
    assert new == {n.GetID() for n in scene_logic.created_nodes(result)}
    geometry = Geometry.from_ijk_to_lps(LPS_FROM_RAS @ IJK_TO_RAS)
    scans = [HistoryScan(EARLY, geometry, SCAN_DAYS[0], "Scan day 0"), HistoryScan(LATE, geometry, SCAN_DAYS[1],
                                                                                   "Scan day 30")]
    calibration, forecast = calibrate_and_forecast(scans, FORECAST_DAYS, plan, settings=settings())
    direct = forecast_ensemble(calibration, FORECAST_DAYS, members=3, seed=5)
    nodes = result["ensemble_probability"]
    assert [n.GetName() for n in nodes] == ["Scan day 30 calibrated tumour probability (ensemble) day 45",
                                            "Scan day 30 calibrated tumour probability (ensemble) day 60"]
    for node, expected in zip(nodes, direct.tumour_probability):
        assert node.GetAttribute("AnatomyDT.RunKind") == "calibration"
        assert node.GetAttribute("AnatomyDT.Role") == "ensemble_probability"
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), expected, atol=1e-7)
        assert np.allclose(_ras(node), _ras(case.flair))
    band = table_rows(result["volume_band_table"])
    assert [r["day"] for r in band] == FORECAST_DAYS and all(r["members"] == 3 for r in band)
    for row, expected, (_, point) in zip(band, direct.volume_band(), forecast.volumes_ml()[1:]):
        assert row["median_tumour_ml"] == pytest.approx(expected["median_ml"])
        assert row["p95_tumour_ml"] == pytest.approx(expected["p95_ml"])
        assert row["point_forecast_tumour_ml"] == pytest.approx(point["tumour"])

    stated = {"version": 1, "radiotherapy": {"start_day": 5, "fractions": 10, "total_dose_gy": 20,
                                             "delayed_death": {"delay_days": 14, "clearance_half_life_days": 21}}}
    case = History()
    before = _node_ids(case.scene)
    with pytest.raises(ParameterError, match="the plan states it"):
        scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45.0], plan=stated,
                                         settings=settings(), ensemble_members=3)
    with pytest.raises(ParameterError, match="between 2 and 256"):
        scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45.0], plan=plan,
                                         settings=settings(), ensemble_members=1)
    assert _node_ids(case.scene) == before


def test_calibration_leaves_inputs_unchanged_and_overlays(calibrated):
    case, result, _, fingerprint, _ = calibrated
    assert case.fingerprint() == fingerprint
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(case.scene)
    for node in result["segmentations"] + [result["table"], result["fit_table"], result["parameter_table"]]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == case.study
    assert case.composite.GetBackgroundVolumeID() == case.flair.GetID()
    assert case.composite.GetForegroundVolumeID() == result["probability_proxy"].GetID()


def test_calibrated_segmentation_reads_back_with_slicerio(calibrated, tmp_path):
    case, result, *_ = calibrated
    _, forecast = direct_calibration()
    path = scene_logic.export_segmentation(result["segmentations"][1], tmp_path / "calibrated60.seg.nrrd")
    data = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in data["segments"]] == list(BRAIN_SCHEMA.names[1:])
    assert all(s["tags"]["DICOM.SegmentAlgorithmType"] == "AUTOMATIC" for s in data["segments"])
    voxels = np.asarray(data["voxels"])
    voxels = voxels[0] if voxels.ndim == 4 else voxels
    ijk_to_lps = np.asarray(data["ijkToLPS"])
    flair_lps = LPS_FROM_RAS @ _ras(case.flair)
    assert np.allclose(ijk_to_lps[:3, :3], flair_lps[:3, :3])
    offset = np.round(np.linalg.solve(flair_lps[:3, :3], ijk_to_lps[:3, 3] - flair_lps[:3, 3])).astype(int)
    full = np.zeros(SHAPE[::-1], dtype=np.int64)  # (i, j, k)
    full[offset[0]:offset[0] + voxels.shape[0], offset[1]:offset[1] + voxels.shape[1],
         offset[2]:offset[2] + voxels.shape[2]] = voxels
    got = np.zeros_like(full)
    for s in data["segments"]:
        got[full == s["labelValue"]] = BRAIN_SCHEMA.index(s["name"])
    assert np.array_equal(got.transpose(2, 1, 0), forecast.labels(1))


# --------------------------------------------------------------------------------------------
# Sequence input, other grids, replace, cancel
# --------------------------------------------------------------------------------------------


def test_sequence_of_segmentations_gives_the_same_forecast():
    case = History()
    sequence = case.sequence()
    pairs = scene_logic.history_from_sequence(sequence)
    assert [day for _, day in pairs] == [0.0, 30.0]
    assert all(node.IsA("vtkMRMLSegmentationNode") for node, _ in pairs)
    result = scene_logic.calibrate_into_scene(case.scene, sequence, case.flair, days=FORECAST_DAYS,
                                              settings=settings(), create_surfaces=False)
    _, forecast = direct_calibration()
    assert [n.GetName() for n in result["segmentations"]] == ["History calibrated day 45", "History calibrated day 60"]
    assert result["segmentations"][0].GetAttribute("AnatomyDT.SourceSegmentationID") == sequence.GetID()
    for i, seg in enumerate(result["segmentations"]):
        assert np.array_equal(_segment_array(seg, "tumour", case.flair), forecast.labels(i) == 1)
    # Index values that are not days need explicit days; explicit days override the index.
    seconds = case.sequence(name="Timed", unit="s", values=("0", "2592000"))
    with pytest.raises(InputError, match="not a number of days"):
        scene_logic.calibrate_into_scene(case.scene, seconds, case.flair, days=[45], settings=settings())
    assert [day for _, day in scene_logic.history_from_sequence(seconds, [0, 30])] == [0.0, 30.0]
    with pytest.raises(InputError, match="one day per item"):
        scene_logic.history_from_sequence(seconds, [0, 30, 60])


def test_earlier_scan_on_its_own_grid_is_resampled_like_the_library_does():
    # The first scan was drawn on a coarser, shifted grid (another session's FLAIR).
    early_ras = IJK_TO_RAS.copy()
    early_ras[:3, :3] *= 1.5
    early_ras[:3, 3] += np.array([0.7, -1.3, 0.9])
    early_shape = (10, 13, 11)
    early = brain(1.2, early_shape)
    case = History(early=early, early_ras=early_ras)
    fingerprint = _input_fingerprint(case.early, case.early_flair)
    result = scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45], settings=settings(),
                                              create_surfaces=False)
    assert _input_fingerprint(case.early, case.early_flair) == fingerprint
    scans = [HistoryScan(early, Geometry.from_ijk_to_lps(LPS_FROM_RAS @ early_ras), 0.0, "Scan day 0"),
             HistoryScan(LATE, case.geometry, 30.0, "Scan day 30")]
    calibration, forecast = calibrate_and_forecast(scans, [45.0], None, settings=settings())
    assert np.array_equal(_segment_array(result["segmentations"][0], "tumour", case.flair), forecast.labels(0) == 1)
    row = table_rows(result["fit_table"])[0]
    assert row["fitted_tumour_ml"] == pytest.approx(calibration.fits[0].fitted_tumour_ml)
    assert row["tumour_dice"] == pytest.approx(calibration.fits[0].tumour_dice)


def test_replace_removes_only_earlier_calibrations():
    case = History()
    prediction = scene_logic.predict_into_scene(case.scene, case.late, case.flair, days=[5], model="pde-only",
                                                create_surfaces=False)
    first = scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45], settings=settings(),
                                             create_surfaces=False)
    second = scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45], settings=settings(),
                                              create_surfaces=False, replace=True)
    for node in scene_logic.created_nodes(first):
        assert node.GetScene() is (case.scene if node.IsA("vtkMRMLColorTableNode") else None)
    assert all(node.GetScene() is case.scene for node in scene_logic.created_nodes(prediction))
    assert second["segmentations"][0].GetName() == "Scan day 30 calibrated day 45"


@pytest.mark.parametrize("cancel_at", [0.3, 0.9])
def test_cancelled_calibration_leaves_no_nodes(cancel_at):
    case = History()
    before = _node_ids(case.scene)
    seen = []
    with pytest.raises(Cancelled):
        scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=FORECAST_DAYS, settings=settings(),
                                         progress=seen.append, cancel=lambda: bool(seen) and seen[-1] >= cancel_at)
    assert _node_ids(case.scene) == before
    assert case.composite.GetForegroundVolumeID() is None
    assert max(seen) >= cancel_at


def _without_tumour_voxels(case):
    """The first scan with its tumour segment emptied (a 'Tumor' segment with no voxel)."""
    node = _import_segmentation(case.scene, np.where(EARLY == 1, 2, EARLY).astype(np.uint8), IJK_TO_RAS, case.flair,
                                name="Scan day 0 (no tumour)", names={2: "White matter", 3: "Cortex", 4: "Ventricles"})
    node.GetSegmentation().AddEmptySegment("tumour_empty", "Tumor")
    return [(node, 0.0), (case.late, 30.0)], [45]


@pytest.mark.parametrize("history, days, message", [
    (lambda c: [(c.late, 30.0)], [45], "at least 2 scans"),
    (lambda c: [(c.early, 30.0), (c.late, 30.0)], [45], "same day 30"),
    (lambda c: [(c.late, 30.0), (c.early, 0.0)], [45], "oldest scan first"),
    (lambda c: [(c.early, -5.0), (c.late, 30.0)], [45], ">= 0"),
    (lambda c: c.pairs(), [30], "after the last scan"),
    (lambda c: c.pairs(), [20, 45], "after the last scan"),
    (lambda c: [(c.early, 0.0), (c.flair, 30.0)], [45], "select a segmentation node"),
    ("no tumour", None, "has no tumour voxels"),
])
def test_bad_history_is_refused_with_a_specific_message(history, days, message):
    case = History()
    if history == "no tumour":
        pairs, days = _without_tumour_voxels(case)
    else:
        pairs = history(case)
    before = _node_ids(case.scene)
    fingerprint = case.fingerprint()
    with pytest.raises(InputError, match=message):
        scene_logic.calibrate_into_scene(case.scene, pairs, case.flair, days=days, settings=settings())
    assert _node_ids(case.scene) == before
    assert case.fingerprint() == fingerprint


def test_history_days_are_only_for_sequences():
    case = History()
    with pytest.raises(InputError, match="sequence"):
        scene_logic.calibrate_into_scene(case.scene, case.pairs(), case.flair, days=[45], history_days=[0, 30])


# --------------------------------------------------------------------------------------------
# Growth-probability map
# --------------------------------------------------------------------------------------------

# 4 mm voxels, so that the members' volumes (tolerance 0.5 mL) differ by whole shells of voxels.
COARSE_RAS = np.array([[-4.0, 0.0, 0.0, 40.0],
                       [0.0, 4.0, 0.0, -30.0],
                       [0.0, 0.0, 4.0, 10.0],
                       [0.0, 0.0, 0.0, 1.0]])
MAP_DAY = 30.0
MEMBERS = 6


def growing_volumes(baseline_ml):
    """A tumour doubling every 30 days, measured 60 and 30 days before the baseline and on it."""
    return [-60.0, -30.0, 0.0], [baseline_ml / 4, baseline_ml / 2, baseline_ml]


@pytest.fixture(scope="module")
def probability_map():
    case = History(ijk_to_ras=COARSE_RAS)
    baseline_ml = float((LATE == 1).sum()) * case.geometry.voxel_volume_ml
    before = _node_ids(case.scene)
    fingerprint = _input_fingerprint(case.late, case.flair)
    fractions = []
    result = scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=MAP_DAY,
                                                    volumes=growing_volumes(baseline_ml), members=MEMBERS,
                                                    bootstrap=200, progress=fractions.append)
    return case, result, before, fingerprint, fractions, baseline_ml


def test_probability_map_values_geometry_and_overlay(probability_map):
    case, result, before, fingerprint, fractions, _ = probability_map
    node = result["probability_map"]
    assert node.GetName() == "Scan day 30 growth probability +30 d"
    p = slicer.util.arrayFromVolume(node)
    assert p.dtype == np.float32 and p.shape == LATE.shape
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert np.allclose(_ras(node), _ras(case.flair))
    assert node.GetImageData().GetDimensions() == case.flair.GetImageData().GetDimensions()
    # Each member's value is a whole fraction of the members.
    assert np.allclose(p * MEMBERS, np.round(p * MEMBERS), atol=1e-5)
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == result["color_table"].GetID() and display.GetApplyThreshold()
    assert case.composite.GetForegroundVolumeID() == node.GetID()
    assert case.composite.GetBackgroundVolumeID() == case.flair.GetID()
    data_nodes = [n for n in _new_nodes(case.scene, before)
                  if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
    assert sorted(n.GetID() for n in data_nodes) == sorted(n.GetID() for n in scene_logic.created_nodes(result))
    assert _input_fingerprint(case.late, case.flair) == fingerprint
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert node.GetAttribute("AnatomyDT.RunKind") == "probability_map"


def test_growing_tumour_is_certain_where_it_is_and_spreads_beyond(probability_map):
    case, result, *_ = probability_map
    p = slicer.util.arrayFromVolume(result["probability_map"])
    tumour = LATE == 1
    assert p[tumour].min() == 1.0  # the baseline tumour stays tumour in every member
    assert (p[~tumour] > 0).sum() > 0  # and it grows into its surroundings
    assert (p[LATE == 0] == 0).all()  # never outside the brain
    # Larger members reach further: some voxels are tumour in some members only.
    assert ((p > 0) & (p < 1)).sum() > 0


def test_probability_report_has_the_burden_fit_and_band(probability_map):
    case, result, *_, baseline_ml = probability_map
    rows = {r["name"]: r for r in table_rows(result["report"])}
    assert 0.9 <= rows["R²"]["value"] <= 1.0
    assert rows["rho_per_day"]["unit"] == "1/day"
    assert rows["rho_per_day"]["value"] == pytest.approx(np.log(2) / 30, rel=1e-3)
    lower, median, upper = (rows[f"forecast on day 30: {q}"]["value"] for q in ("5 %", "median", "95 %"))
    assert lower <= median <= upper and median == pytest.approx(2 * baseline_ml, rel=0.2)
    assert rows["tumour volume on day 0"]["value"] == pytest.approx(baseline_ml)
    assert rows["members"]["value"] == MEMBERS
    p = slicer.util.arrayFromVolume(result["probability_map"])
    assert rows["map volume p > 0"]["value"] == pytest.approx((p > 0).sum() * case.geometry.voxel_volume_ml)
    assert "members" in result["report"].GetAttribute("AnatomyDT.Summary")


def test_probability_map_from_history_nodes_measures_their_volumes():
    case = History(ijk_to_ras=COARSE_RAS)
    result = scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=10,
                                                    history=[(case.early, -30), (case.late, 0)], members=2,
                                                    bootstrap=50)
    rows = {r["name"]: r for r in table_rows(result["report"])}
    voxel_ml = case.geometry.voxel_volume_ml
    assert rows["tumour volume on day -30"]["value"] == pytest.approx((EARLY == 1).sum() * voxel_ml)
    assert rows["tumour volume on day 0"]["value"] == pytest.approx((LATE == 1).sum() * voxel_ml)


def test_probability_map_bad_inputs_and_cancel():
    case = History(ijk_to_ras=COARSE_RAS)
    before = _node_ids(case.scene)
    volumes = growing_volumes(4.0)
    with pytest.raises(InputError, match="not both and not neither"):
        scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=30)
    with pytest.raises(InputError, match="> 0"):
        scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=0, volumes=volumes)
    with pytest.raises(InputError, match="at least 2"):
        scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=30, volumes=([0.0], [4.0]))
    seen = []
    with pytest.raises(Cancelled):
        scene_logic.probability_map_into_scene(case.scene, case.late, case.flair, day=30, volumes=volumes, members=3,
                                               bootstrap=50, progress=seen.append,
                                               cancel=lambda: bool(seen) and seen[-1] >= 0.9)
    assert _node_ids(case.scene) == before
    assert case.composite.GetForegroundVolumeID() is None


def test_baseline_day_puts_measurements_and_plan_on_the_plan_axis():
    """The same patient described with the baseline on day 0 (earlier scans negative, as the CLI) and on day 60
    of the plan's axis gives the same map and band: the plan is seen from the baseline day for the PDE."""
    case = History(ijk_to_ras=COARSE_RAS)
    baseline_ml = float((LATE == 1).sum()) * case.geometry.voxel_volume_ml
    days, volumes = growing_volumes(baseline_ml)
    maps, bands = [], []
    for offset in (0.0, 60.0):
        plan = {"radiotherapy": {"start_day": offset + 10, "fractions": 5, "fractions_per_week": 5,
                                 "total_dose_gy": 10}}
        result = scene_logic.probability_map_into_scene(
            case.scene, case.late, case.flair, day=20, volumes=([d + offset for d in days], volumes),
            baseline_day=offset, plan=plan, members=3, bootstrap=50)
        maps.append(slicer.util.arrayFromVolume(result["probability_map"]).copy())
        rows = {r["name"]: r["value"] for r in table_rows(result["report"])}
        bands.append([rows[f"forecast on day {offset + 20:g}: {q}"] for q in ("5 %", "median", "95 %")])
        assert rows[f"tumour volume on day {offset:g}"] == pytest.approx(baseline_ml)
    assert np.array_equal(maps[0], maps[1])
    assert np.allclose(bands[0], bands[1], rtol=1e-6)
    assert maps[0][LATE == 1].min() == 1.0
