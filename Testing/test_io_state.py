"""Tests for AnatomyDTLib.io and AnatomyDTLib.state: files, geometry, labelmap <-> field.

Everything uses real files in tmp_path (NIfTI, NRRD, MetaImage, 3D Slicer .seg.nrrd); no mocks.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from scipy import ndimage

from AnatomyDTLib.errors import InputError, OutputExistsError, ParameterError
from AnatomyDTLib.io import (Geometry, LabelVolume, atomic_output, read_image, read_labelmap, write_image,
                             write_labelmap)
from AnatomyDTLib.schema import BRAIN_SCHEMA, ClassSchema
from AnatomyDTLib.state import AnatomyState, check_field, field_to_labels, labels_to_field

K = BRAIN_SCHEMA.num_classes


# ------------------------------------------------------------------ fixtures and helpers


def rotation_3d(angle: float) -> np.ndarray:
    """A proper rotation that also swaps axes: about S by ``angle``, after mapping y -> S (coronal acquisition)."""
    about_s = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1]])
    coronal = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    return about_s @ coronal


@pytest.fixture
def geometry_3d() -> Geometry:
    """Anisotropic (0.8 x 0.8 x 6 mm), off-origin, oblique grid, as for a thick-slice clinical FLAIR."""
    return Geometry(spacing=(0.8, 0.8, 6.0), origin=(-97.5, 120.25, -33.1), direction=rotation_3d(0.3).ravel())


@pytest.fixture
def geometry_2d() -> Geometry:
    return Geometry(spacing=(0.8, 1.7), origin=(-12.5, 30.75), direction=(0.0, 1.0, -1.0, 0.0))


def phantom_3d(shape=(5, 14, 18)) -> np.ndarray:
    """All five classes, asymmetric so any axis mix-up shows: (z, y, x) array order."""
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(x >= 2) & (x < 16) & (y >= 2)] = 2  # white matter
    labels[(x >= 2) & (x < 16) & (y >= 11)] = 3  # grey matter rim
    labels[(x >= 4) & (x < 7) & (y >= 3) & (y < 6)] = 4  # ventricle
    labels[(x >= 9) & (x < 13) & (y >= 5) & (y < 9) & (z >= 1) & (z < 4)] = 1  # tumour
    return labels


def phantom_2d(shape=(11, 16)) -> np.ndarray:
    return phantom_3d((1,) + shape)[0].copy()


def assert_same_geometry(read: Geometry, expected: Geometry, ext: str) -> None:
    """NIfTI stores geometry in float32; the other formats keep doubles."""
    rtol, atol = (1e-6, 1e-4) if ext.startswith(".nii") else (1e-12, 1e-9)
    assert read.ndim == expected.ndim
    np.testing.assert_allclose(read.spacing, expected.spacing, rtol=rtol, atol=0)
    np.testing.assert_allclose(read.origin, expected.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(read.direction, expected.direction, rtol=0, atol=rtol)


def write_sitk(path, array, geometry: Geometry | None = None) -> str:
    image = sitk.GetImageFromArray(array)
    if geometry is not None:
        geometry.apply_to_sitk(image)
    sitk.WriteImage(image, str(path))
    return str(path)


def slicer_style_segmentation(path, shape_ijk, ijk_to_lps, named_masks) -> str:
    """A .seg.nrrd written by slicerio itself (as 3D Slicer would), with the given segments (name, mask ijk)."""
    segmentation = slicerio.create_segmentation(shape_ijk, ijk_to_lps)
    for name, mask in named_masks:
        slicerio.add_segment(segmentation, mask, {"name": name, "color": [0.5, 0.5, 0.5]})
    slicerio.write_segmentation(str(path), segmentation)
    return str(path)


# ------------------------------------------------------------------ Geometry


def test_geometry_properties_and_affine(geometry_3d):
    assert geometry_3d.ndim == 3
    assert geometry_3d.spacing_array_order == (6.0, 0.8, 0.8)
    assert geometry_3d.voxel_volume_ml == pytest.approx(0.8 * 0.8 * 6.0 / 1000.0)
    affine = geometry_3d.ijk_to_lps()
    image = geometry_3d.apply_to_sitk(sitk.Image(4, 5, 6, sitk.sitkUInt8))
    for index in [(0, 0, 0), (3, 1, 2), (1, 4, 5)]:
        expected = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(affine @ np.array([*index, 1.0]), [*expected, 1.0], atol=1e-9)
    assert Geometry.from_sitk(image) == geometry_3d
    assert Geometry.from_ijk_to_lps(affine).matches(geometry_3d, rtol=1e-12, atol_mm=1e-9)


def test_geometry_defaults_and_invalid_values():
    g = Geometry(spacing=(1.0, 2.0))
    assert g.origin == (0.0, 0.0) and g.direction == (1.0, 0.0, 0.0, 1.0)
    assert g.spacing_array_order == (2.0, 1.0)
    with pytest.raises(InputError, match="positive"):
        Geometry(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="Inconsistent geometry"):
        Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0))


def test_geometry_matches_tolerances_and_error_message(geometry_3d):
    nudged = Geometry(geometry_3d.spacing, tuple(o + 1e-4 for o in geometry_3d.origin), geometry_3d.direction)
    moved = Geometry(geometry_3d.spacing, tuple(o + 0.5 for o in geometry_3d.origin), geometry_3d.direction)
    coarser = Geometry((1.0, 1.0, 6.0), geometry_3d.origin, geometry_3d.direction)
    assert geometry_3d.matches(nudged)
    assert not geometry_3d.matches(moved)
    assert not geometry_3d.matches(coarser)
    assert not geometry_3d.matches(Geometry((0.8, 0.8)))
    geometry_3d.check_matches(nudged, "baseline vs follow-up", shape=(5, 6, 7), other_shape=(5, 6, 7))
    with pytest.raises(InputError) as err:
        geometry_3d.check_matches(coarser, "baseline vs follow-up", shape=(5, 6, 7), other_shape=(5, 6, 7))
    message = str(err.value)
    assert "baseline vs follow-up" in message and "Resample" in message
    assert "0.8x0.8x6 mm" in message and "1x1x6 mm" in message and "7x6x5 voxels" in message
    with pytest.raises(InputError, match="8x6x5 voxels"):
        geometry_3d.check_matches(geometry_3d, "sizes", shape=(5, 6, 7), other_shape=(5, 6, 8))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_round_trip_3d_keeps_labels_and_geometry(tmp_path, geometry_3d, ext):
    labels = phantom_3d()
    state = AnatomyState.from_labelmap(LabelVolume(labels, geometry_3d, BRAIN_SCHEMA))
    assert state.field.shape == (K,) + labels.shape
    np.testing.assert_array_equal(state.to_labels(), labels)

    written = state.save(tmp_path / f"out{ext}")
    volume = read_labelmap(written)

    np.testing.assert_array_equal(volume.labels, labels)
    assert volume.labels.dtype == np.uint8
    assert_same_geometry(volume.geometry, geometry_3d, ext)
    assert volume.source == str(written)
    assert sorted(os.listdir(tmp_path)) == [f"out{ext}"]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_round_trip_2d_keeps_labels_and_geometry(tmp_path, geometry_2d, ext):
    labels = phantom_2d()
    state = AnatomyState.from_labelmap(LabelVolume(labels, geometry_2d), soften_mm=1.0)
    assert state.field.shape == (K,) + labels.shape

    volume = read_labelmap(state.save(tmp_path / f"slice{ext}"))

    assert volume.labels.shape == labels.shape
    np.testing.assert_array_equal(volume.labels, state.to_labels())
    assert_same_geometry(volume.geometry, geometry_2d, ext)


def test_reading_does_not_modify_the_input(tmp_path, geometry_3d):
    path = write_labelmap(tmp_path / "in.seg.nrrd", phantom_3d(), geometry_3d)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    AnatomyState.from_file(path, soften_mm=2.0).save(tmp_path / "out.seg.nrrd")
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


# ------------------------------------------------------------------ .seg.nrrd details


def test_written_seg_nrrd_as_slicerio_sees_it(tmp_path, geometry_3d):
    labels = phantom_3d()
    labels[labels == 4] = 2  # no ventricles: absent classes get no segment
    path = write_labelmap(tmp_path / "s.seg.nrrd", labels, geometry_3d, BRAIN_SCHEMA,
                          extra_segment_tags={"AnatomyDT.Time": "30 d", "AnatomyDT.Model": "pde-v1"})

    seg = slicerio.read_segmentation(str(path))

    names = [s["name"] for s in seg["segments"]]
    assert names == ["tumour", "white_matter", "grey_matter"]  # no background segment
    for segment in seg["segments"]:
        k = BRAIN_SCHEMA.index(segment["name"])
        assert segment["labelValue"] == k
        assert segment["layer"] == 0
        assert segment["id"] == segment["name"]
        np.testing.assert_allclose(segment["color"], BRAIN_SCHEMA.colors[k], atol=1e-6)
        assert segment["tags"] == {"AnatomyDT.Time": "30 d", "AnatomyDT.Model": "pde-v1"}
    voxels = seg["voxels"]
    assert voxels.shape == labels.shape[::-1]  # slicerio is (i, j, k), we are (k, j, i)
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), labels)
    k, j, i = 2, 6, 10  # inside the tumour
    assert labels[k, j, i] == 1 and voxels[i, j, k] == 1
    np.testing.assert_allclose(seg["ijkToLPS"], geometry_3d.ijk_to_lps(), atol=1e-9)


def test_slicer_segment_names_map_to_classes(tmp_path, geometry_3d):
    shape_ijk = (8, 7, 4)
    masks = {}
    for n, name in enumerate(["Tumor", "White matter", "Cortex", "Ventricles"]):
        mask = np.zeros(shape_ijk, dtype=bool)
        mask[n * 2:(n + 1) * 2, 1:6, 1:3] = True
        masks[name] = mask
    path = slicer_style_segmentation(tmp_path / "from_slicer.seg.nrrd", shape_ijk, geometry_3d.ijk_to_lps(),
                                     list(masks.items()))

    volume = read_labelmap(path)

    assert volume.labels.shape == shape_ijk[::-1]
    expected = {"Tumor": "tumour", "White matter": "white_matter", "Cortex": "grey_matter",
                "Ventricles": "lateral_ventricles"}
    for name, mask in masks.items():
        assert np.all(volume.labels[mask.transpose(2, 1, 0)] == BRAIN_SCHEMA.index(expected[name])), name
    unsegmented = ~np.any(list(masks.values()), axis=0).transpose(2, 1, 0)
    assert np.all(volume.labels[unsegmented] == BRAIN_SCHEMA.background_index)
    assert_same_geometry(volume.geometry, geometry_3d, ".seg.nrrd")


def test_unknown_segment_name_is_refused_unless_class_map_says(tmp_path, geometry_3d):
    mask = np.zeros((6, 5, 4), dtype=bool)
    mask[1:3, 1:3, 1:3] = True
    other = np.zeros_like(mask)
    other[4:, :, :] = True
    path = slicer_style_segmentation(tmp_path / "s.seg.nrrd", mask.shape, geometry_3d.ijk_to_lps(),
                                     [("Segment_7", mask), ("Tumor", other)])

    with pytest.raises(InputError) as err:
        read_labelmap(path)
    assert "'Segment_7'" in str(err.value) and "lateral_ventricles" in str(err.value) and "--classes" in str(err.value)

    volume = read_labelmap(path, class_map={"segment_7": "tumour", "Tumor": "white_matter"})
    assert np.all(volume.labels[mask.T] == BRAIN_SCHEMA.index("tumour"))
    assert np.all(volume.labels[other.T] == BRAIN_SCHEMA.index("white_matter"))  # override beats the name


def test_overlapping_segments(tmp_path, geometry_3d):
    tumour = np.zeros((6, 5, 4), dtype=bool)
    tumour[1:4, 1:4, 1:3] = True
    lesion = np.zeros_like(tumour)
    lesion[2:5, 2:5, 1:3] = True
    same_class = slicer_style_segmentation(tmp_path / "same.seg.nrrd", tumour.shape, geometry_3d.ijk_to_lps(),
                                           [("Tumor", tumour), ("Lesion", lesion)])
    assert slicerio.read_segmentation(same_class)["voxels"].ndim == 4  # really two layers

    volume = read_labelmap(same_class)
    union = (tumour | lesion).T
    assert np.all(volume.labels[union] == BRAIN_SCHEMA.tumour_index)
    assert np.all(volume.labels[~union] == BRAIN_SCHEMA.background_index)

    conflicting = slicer_style_segmentation(tmp_path / "conflict.seg.nrrd", tumour.shape, geometry_3d.ijk_to_lps(),
                                            [("Tumor", tumour), ("Cortex", lesion)])
    with pytest.raises(InputError) as err:
        read_labelmap(conflicting)
    message = str(err.value)
    assert "'Tumor'" in message and "'Cortex'" in message and "overlap" in message
    assert f"{int((tumour & lesion).sum())} voxels" in message


def test_invalid_segment_tags_are_refused(tmp_path, geometry_3d):
    with pytest.raises(InputError, match="invalid"):
        write_labelmap(tmp_path / "t.seg.nrrd", phantom_3d(), geometry_3d, extra_segment_tags={"a|b": "x"})
    with pytest.raises(InputError, match="reserved"):
        write_labelmap(tmp_path / "t.seg.nrrd", phantom_3d(), geometry_3d,
                       extra_segment_tags={"Segmentation.Status": "completed"})
    assert not (tmp_path / "t.seg.nrrd").exists()


# ------------------------------------------------------------------ labelmap values


def test_float_masks_are_rounded_and_fractions_refused(tmp_path, geometry_3d):
    labels = phantom_3d()
    noisy = labels.astype(np.float32) + np.float32(2e-5)
    volume = read_labelmap(write_sitk(tmp_path / "float_mask.nii.gz", noisy, geometry_3d))
    np.testing.assert_array_equal(volume.labels, labels)
    assert volume.labels.dtype == np.uint8

    noisy[0, 0, 0] = 2.5
    with pytest.raises(InputError) as err:
        read_labelmap(write_sitk(tmp_path / "interpolated.nii.gz", noisy, geometry_3d))
    assert "non-integer" in str(err.value) and "2.5" in str(err.value) and "nearest-neighbour" in str(err.value)


def test_labels_outside_schema_are_listed_with_counts(tmp_path, geometry_3d):
    labels = phantom_3d().astype(np.int16)
    labels[0, 0, :3] = 7
    labels[0, 1, 0] = -1
    path = write_sitk(tmp_path / "brats_like.nrrd", labels, geometry_3d)

    with pytest.raises(InputError) as err:
        read_labelmap(path)
    message = str(err.value)
    assert "7 (3 voxels)" in message and "-1 (1 voxels)" in message and "--classes" in message

    volume = read_labelmap(path, class_map={7: "tumour", "-1": "background", 1: "tumour", 2: "White matter",
                                            3: "grey_matter", 4: 4})
    assert np.all(volume.labels[0, 0, :3] == BRAIN_SCHEMA.tumour_index)
    assert volume.labels[0, 1, 0] == BRAIN_SCHEMA.background_index
    mapped = labels[(labels >= 0) & (labels < 5)]
    np.testing.assert_array_equal(volume.labels[(labels >= 0) & (labels < 5)], mapped)


def test_class_map_must_cover_every_value_except_zero(tmp_path, geometry_3d):
    brats = np.zeros((3, 6, 6), dtype=np.uint8)
    brats[1, 1:3, 1:3] = 1
    brats[1, 3:5, 1:3] = 2
    brats[1, 1:3, 3:5] = 4
    path = write_sitk(tmp_path / "brats.nii.gz", brats, geometry_3d)

    volume = read_labelmap(path, class_map={1: "tumour", 2: "tumour", 4: "tumour"})
    np.testing.assert_array_equal(volume.labels, np.where(brats > 0, BRAIN_SCHEMA.tumour_index, 0))

    with pytest.raises(InputError) as err:
        read_labelmap(path, class_map={1: "tumour", 2: "tumour"})
    assert "missing from the class map" in str(err.value) and "4 (4 voxels)" in str(err.value)


def test_label_volume_rejects_float_or_mismatched_arrays(geometry_3d):
    with pytest.raises(InputError, match="integer"):
        LabelVolume(np.zeros((2, 3, 4), dtype=np.float32), geometry_3d)
    with pytest.raises(InputError, match="3D"):
        LabelVolume(np.zeros((3, 4), dtype=np.uint8), geometry_3d)


# ------------------------------------------------------------------ images and file errors


def test_read_image_returns_float32_and_geometry_and_refuses_nan(tmp_path, geometry_3d):
    flair = np.linspace(0, 500, 5 * 6 * 7, dtype=np.float64).reshape(5, 6, 7)
    path = write_image(tmp_path / "flair.nrrd", flair, geometry_3d)
    array, geometry = read_image(path)
    assert array.dtype == np.float32 and array.shape == flair.shape
    np.testing.assert_allclose(array, flair, rtol=1e-6)
    assert_same_geometry(geometry, geometry_3d, ".nrrd")

    flair[2, 3, 4] = np.nan
    flair[0, 0, 0] = np.inf
    for name in ("broken.nii.gz", "broken.nii", "broken.nrrd"):  # ITK's NIfTI reader alone would turn NaN into 0
        with pytest.raises(InputError) as err:
            read_image(write_sitk(tmp_path / name, flair.astype(np.float32), geometry_3d))
        assert "2 NaN or infinite voxels" in str(err.value) and name in str(err.value)
    nan_mask = np.zeros((3, 4, 5), dtype=np.float64)
    nan_mask[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        read_labelmap(write_sitk(tmp_path / "nan_mask.nii.gz", nan_mask, geometry_3d))
    with pytest.raises(InputError, match="NaN/inf"):
        write_image(tmp_path / "never.nii.gz", flair, geometry_3d)
    assert not (tmp_path / "never.nii.gz").exists()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        read_labelmap(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.nrrd")

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError) as err:
        read_labelmap(garbage)
    assert "Cannot read" in str(err.value) and "garbage.nii.gz" in str(err.value)

    bad_nrrd = tmp_path / "bad.seg.nrrd"
    bad_nrrd.write_bytes(b"NRRD0004\nthis header is broken\n")
    with pytest.raises(InputError, match="bad.seg.nrrd"):
        read_labelmap(bad_nrrd)

    png = tmp_path / "labels.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="Unsupported file type"):
        read_labelmap(png)


# ------------------------------------------------------------------ atomic writes


def test_existing_output_is_kept_without_force(tmp_path, geometry_3d):
    path = write_labelmap(tmp_path / "out.nii.gz", phantom_3d(), geometry_3d)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)

    with pytest.raises(OutputExistsError) as err:
        write_labelmap(path, np.zeros((5, 14, 18), dtype=np.uint8), geometry_3d)
    assert "--force" in str(err.value) and "out.nii.gz" in str(err.value)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]

    write_labelmap(path, np.zeros((5, 14, 18), dtype=np.uint8), geometry_3d, force=True)
    assert np.all(read_labelmap(path).labels == 0)
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]


def test_atomic_output_uses_a_sibling_temp_file_and_cleans_up(tmp_path):
    target = tmp_path / "new" / "dir" / "case.seg.nrrd"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".seg.nrrd") and tmp.name.startswith(".tmp-")
        tmp.write_bytes(b"complete")
        assert not target.exists()
    assert target.read_bytes() == b"complete"

    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_output(target, force=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"complete"
    assert sorted(os.listdir(target.parent)) == ["case.seg.nrrd"]


# ------------------------------------------------------------------ labels <-> field


def test_one_hot_field_unbatched_and_batched():
    labels = phantom_3d()
    field = labels_to_field(labels, K)
    assert field.shape == (K,) + labels.shape and field.dtype == torch.float32
    assert torch.equal(field.sum(0), torch.ones(labels.shape))
    assert torch.equal(field_to_labels(field), torch.from_numpy(labels).long())

    batch = torch.stack([torch.from_numpy(labels), torch.from_numpy(labels[:, ::-1].copy())]).to(torch.int16)
    batched = labels_to_field(batch, K, batched=True, dtype=torch.float64)
    assert batched.shape == (2, K) + labels.shape and batched.dtype == torch.float64
    assert torch.equal(batched[1], labels_to_field(batch[1], K, dtype=torch.float64))
    assert torch.equal(field_to_labels(batched, batched=True), batch.long())


def test_labels_outside_range_and_bad_parameters():
    labels = np.array([[0, 1, 5], [6, 6, -2]])
    with pytest.raises(InputError) as err:
        labels_to_field(labels, 5)
    assert "-2 (1 voxels)" in str(err.value) and "5 (1 voxels)" in str(err.value) and "6 (2 voxels)" in str(err.value)
    with pytest.raises(InputError, match="integers"):
        labels_to_field(labels.astype(np.float32), 7)
    with pytest.raises(ParameterError, match="spacing"):
        labels_to_field(np.zeros((4, 4), dtype=np.int64), 2, soften_mm=1.0)
    with pytest.raises(ParameterError, match="soften_mm"):
        labels_to_field(np.zeros((4, 4), dtype=np.int64), 2, soften_mm=-1.0, spacing=(1.0, 1.0))


def test_argmax_ties_go_to_the_lowest_class():
    p = torch.tensor([[0.5, 0.2], [0.5, 0.4], [0.0, 0.4]]).reshape(3, 2, 1)
    assert field_to_labels(p).flatten().tolist() == [0, 1]


def test_check_field_reports_what_and_where():
    good = labels_to_field(phantom_2d(), K)
    check_field(good)
    check_field(good.unsqueeze(0), batched=True)

    nan = good.clone()
    nan[2, 3, 4] = float("nan")
    with pytest.raises(InputError, match=r"predicted field has NaN or infinite values in 1 of 176 voxels \(first at index \(3, 4\)\)"):
        check_field(nan, what="predicted field")

    negative = good.clone()
    assert good[2, 8, 3] == 1.0
    negative[0, 8, 3] -= 0.01
    negative[2, 8, 3] += 0.01
    with pytest.raises(InputError, match=r"negative probabilities \(down to -0.01\) in 1 of 176 voxels \(first at index \(8, 3\)\)"):
        check_field(negative)
    check_field(negative, atol=0.02)

    drift = good.clone()
    drift[:, :2] *= 1.001
    with pytest.raises(InputError, match="does not sum to 1.*32 of 176 voxels"):
        check_field(drift.unsqueeze(0), batched=True)
    with pytest.raises(InputError, match="unbatched"):
        check_field(good[0])


# ------------------------------------------------------------------ softening


def two_class_step(shape, axis, boundary_index) -> np.ndarray:
    """Class 1 where the index along ``axis`` is >= boundary_index, else class 0."""
    index = np.indices(shape)[axis]
    return (index >= boundary_index).astype(np.int64)


def width_sigma_mm(profile: np.ndarray, spacing_mm: float) -> float:
    """Width of a smoothed step, as the Gaussian sigma in mm: sigma = sqrt(pi) * integral of p (1 - p)."""
    return math.sqrt(math.pi) * float(np.sum(profile * (1.0 - profile))) * spacing_mm


def test_softened_field_is_on_the_simplex_and_keeps_labels_away_from_boundaries():
    spacing = (6.0, 0.8, 0.8)  # array order z, y, x
    labels = np.zeros((7, 30, 34), dtype=np.int64)
    labels[:, 5:25, 4:30] = 2
    labels[1:6, 10:20, 10:22] = 1
    labels[:, 5:25, 26:30] = 3

    field = labels_to_field(labels, K, soften_mm=2.0, spacing=spacing)

    assert torch.all(field >= 0) and torch.all(field <= 1)
    assert torch.max(torch.abs(field.sum(0) - 1)).item() < 1e-6
    boundary_distance_mm = np.min([
        ndimage.distance_transform_edt(labels == k, sampling=spacing) + ndimage.distance_transform_edt(labels != k, sampling=spacing)
        for k in np.unique(labels)
    ], axis=0)  # distance to the nearest voxel of another class (from either side)
    far = boundary_distance_mm > 2.0
    assert far.sum() > 0.3 * labels.size  # not a vacuous check
    np.testing.assert_array_equal(field_to_labels(field).numpy()[far], labels[far])
    very_far = boundary_distance_mm > 3 * 2.0 + max(spacing)
    assert torch.all(field.max(0).values[torch.from_numpy(very_far)] == 1.0)  # interior stays exactly one-hot
    soft = (field.max(0).values < 0.99).numpy()
    assert soft.any() and boundary_distance_mm[soft].max() <= 3 * 2.0 + max(spacing)


@pytest.mark.parametrize("soften_mm", [6.0, 12.0])
def test_soft_band_width_scales_with_soften_mm_in_mm_on_anisotropic_grid(soften_mm):
    spacing = (6.0, 0.8, 0.8)  # array order: 6 mm slices, 0.8 mm in-plane
    along_x = labels_to_field(two_class_step((1, 1, 128), axis=2, boundary_index=64), 2,
                              soften_mm=soften_mm, spacing=spacing)[1, 0, 0].numpy()
    along_z = labels_to_field(two_class_step((24, 1, 1), axis=0, boundary_index=12), 2,
                              soften_mm=soften_mm, spacing=spacing)[1, :, 0, 0].numpy()

    assert width_sigma_mm(along_x, 0.8) == pytest.approx(soften_mm, rel=0.1)
    assert width_sigma_mm(along_z, 6.0) == pytest.approx(soften_mm, rel=0.1)
    # the same width in mm is 7.5x more voxels in-plane than across slices
    soft_voxels_x = int(np.sum((along_x > 0.01) & (along_x < 0.99)))
    soft_voxels_z = int(np.sum((along_z > 0.01) & (along_z < 0.99)))
    assert soft_voxels_x > 5 * soft_voxels_z
    # monotone profile through 0.5 at the boundary
    assert np.all(np.diff(along_x) >= 0) and along_x[63] < 0.5 < along_x[64]


def test_soften_zero_is_exactly_one_hot_and_2d_works():
    labels = phantom_2d()
    assert torch.equal(labels_to_field(labels, K, soften_mm=0.0), labels_to_field(labels, K))
    soft = labels_to_field(labels, K, soften_mm=1.5, spacing=(1.7, 0.8))
    assert soft.shape == (K,) + labels.shape
    assert torch.max(torch.abs(soft.sum(0) - 1)).item() < 1e-6
    assert 0 < int(((soft > 0.01) & (soft < 0.99)).any(0).sum()) < labels.size


# ------------------------------------------------------------------ AnatomyState


def test_state_from_file_volumes_and_save(tmp_path, geometry_3d):
    labels = phantom_3d()
    path = write_labelmap(tmp_path / "baseline.nrrd", labels, geometry_3d)

    state = AnatomyState.from_file(path, soften_mm=1.0)

    check_field(state.field, atol=1e-6)
    assert state.spatial_shape == labels.shape
    volumes = state.class_volumes_ml()
    assert list(volumes) == list(BRAIN_SCHEMA.names)
    counts = np.bincount(state.to_labels().ravel(), minlength=K)
    for k, name in enumerate(BRAIN_SCHEMA.names):
        assert volumes[name] == pytest.approx(counts[k] * 0.8 * 0.8 * 6.0 / 1000.0)
    hard = AnatomyState.from_file(path)
    assert hard.class_volumes_ml()["tumour"] == pytest.approx(np.sum(labels == 1) * 0.00384)
    assert hard.to_label_volume().geometry == hard.geometry

    with pytest.raises(InputError, match="shape"):
        AnatomyState(torch.zeros((3,) + labels.shape), geometry_3d, BRAIN_SCHEMA)


def test_schema_whose_background_is_not_class_zero_round_trips_through_seg_nrrd(tmp_path, geometry_2d):
    schema = ClassSchema.generic(3, tumour_index=0, sink_index=2)  # background is class 2
    labels = np.array([[0, 1, 2, 2], [2, 2, 1, 0]], dtype=np.uint8)
    path = write_labelmap(tmp_path / "g.seg.nrrd", labels, geometry_2d, schema)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["class_0", "class_1"]
    assert np.all(seg["voxels"][..., 0].T[labels == 2] == 0)  # background is "no segment" for Slicer
    np.testing.assert_array_equal(read_labelmap(path, schema=schema).labels, labels)
