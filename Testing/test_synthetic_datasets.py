"""Tests of the synthetic paired datasets (AnatomyDTLib.datasets.synthetic).

No mocks: every test generates real cases and measures properties on the label maps.
"""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from AnatomyDTLib.datasets import (
    MANIFEST_COLUMNS,
    case_rng,
    class_names,
    default_options,
    generate_case,
    generate_vessel_case,
    generate_voronoi_case,
    load_dataset,
    make_dataset,
    surviving_fraction,
)
from AnatomyDTLib.errors import InputError, OutputExistsError, ParameterError

UNTREATED = {"treated": 0, "interval_days": 90}
HIGH_DOSE = {"treated": 1, "dose_gy": 70, "interval_days": 90}
TUMOUR, VESSEL = 1, 2


def _first_tissue(kind):
    return 2 if kind == "voronoi" else 3


def _count(labels, k):
    return int((labels == k).sum())


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_same_seed_gives_same_case(kind):
    a = generate_case(kind, 64, case_rng(42, 3))
    b = generate_case(kind, 64, case_rng(42, 3))
    np.testing.assert_array_equal(a["labels_t0"], b["labels_t0"])
    np.testing.assert_array_equal(a["labels_t1"], b["labels_t1"])
    assert a["treatment"] == b["treatment"]


@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_different_seeds_and_cases_differ(kind):
    a = generate_case(kind, 64, case_rng(1, 0))
    b = generate_case(kind, 64, case_rng(2, 0))
    c = generate_case(kind, 64, case_rng(1, 1))
    assert (a["labels_t0"] != b["labels_t0"]).mean() > 0.05
    assert (a["labels_t0"] != c["labels_t0"]).mean() > 0.05


def test_case_does_not_depend_on_dataset_size(tmp_path):
    small = load_dataset(make_dataset("vessel", 2, 64, 5, tmp_path / "n2"))
    large = load_dataset(make_dataset("vessel", 4, 64, 5, tmp_path / "n4"))
    for i in range(2):
        np.testing.assert_array_equal(small[i]["labels_t0"], large[i]["labels_t0"])
        np.testing.assert_array_equal(small[i]["labels_t1"], large[i]["labels_t1"])
        assert small[i]["treatment"] == large[i]["treatment"]
    assert (large[2]["labels_t0"] != large[1]["labels_t0"]).any()


@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_treatment_override_keeps_t0(kind):
    a = generate_case(kind, 64, case_rng(3, 0), treatment=UNTREATED)
    b = generate_case(kind, 64, case_rng(3, 0), treatment=HIGH_DOSE)
    np.testing.assert_array_equal(a["labels_t0"], b["labels_t0"])
    assert (a["labels_t1"] != b["labels_t1"]).any()
    assert b["treatment"] == {"treated": 1.0, "dose_gy": 70.0, "interval_days": 90.0}


# --------------------------------------------------------------------------------------------
# Labels, classes, treatment variables
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_label_range_and_class_presence(kind):
    names = class_names(kind)
    assert len(names) == 5 and names[0] == "background" and names[1] == "tumour"
    if kind == "vessel":
        assert names[2] == "vessel"
    for i in range(5):
        case = generate_case(kind, 64, case_rng(7, i), treatment=UNTREATED)
        t0, t1 = case["labels_t0"], case["labels_t1"]
        for lab in (t0, t1):
            assert lab.shape == (64, 64) and lab.dtype == np.uint8
            assert lab.min() >= 0 and lab.max() <= len(names) - 1
        assert set(np.unique(t0)) == set(range(len(names))), f"case {i} misses a class at t0"
        assert _count(t1, TUMOUR) > 0
        # The body outline (background) is rigid: identical at both time points.
        np.testing.assert_array_equal(t0 == 0, t1 == 0)
        assert 0.3 < (t0 > 0).mean() < 0.8


def test_region_count_option_changes_classes():
    case = generate_voronoi_case(96, case_rng(0, 0), n_regions=6)
    assert class_names("voronoi", n_regions=6)[-1] == "region_6"
    assert case["labels_t0"].max() == 7
    assert len(np.unique(case["labels_t0"])) == 8


@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_sampled_treatment_variables(kind):
    opts = default_options(kind)
    treated = []
    for i in range(30):
        t = generate_case(kind, 64, case_rng(11, i))["treatment"]
        assert set(t) == {"treated", "dose_gy", "interval_days"}
        assert all(isinstance(v, float) for v in t.values())
        assert t["treated"] in (0.0, 1.0)
        if t["treated"]:
            assert opts["dose_gy"][0] - 1 <= t["dose_gy"] <= opts["dose_gy"][1] + 1
        else:
            assert t["dose_gy"] == 0.0
        assert opts["interval_days"][0] <= t["interval_days"] <= opts["interval_days"][1]
        treated.append(t["treated"])
    assert 5 <= sum(treated) <= 25


def test_linear_quadratic_survival():
    assert surviving_fraction(0.0) == 1.0
    s = [surviving_fraction(d) for d in (10, 30, 60)]
    assert s[0] > s[1] > s[2] > 0
    # alpha + beta * d = 0.035 + 0.0035 * 2 per Gy
    assert s[2] == pytest.approx(np.exp(-0.042 * 60))


# --------------------------------------------------------------------------------------------
# Dynamics: growth, treatment response, displacement
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_untreated_grows_and_high_dose_shrinks(kind):
    untreated, treated = [], []
    for i in range(20):
        a = generate_case(kind, 64, case_rng(21, i), treatment=UNTREATED)
        b = generate_case(kind, 64, case_rng(21, i), treatment=HIGH_DOSE)
        n0 = _count(a["labels_t0"], TUMOUR)
        untreated.append(_count(a["labels_t1"], TUMOUR) / n0)
        treated.append(_count(b["labels_t1"], TUMOUR) / n0)
    assert np.mean(untreated) > 1.8
    assert min(untreated) > 1.0
    assert np.mean(treated) < 0.6
    assert all(t < u for t, u in zip(treated, untreated))


@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_response_depends_on_dose_and_sampled_treatment(kind):
    low = generate_case(kind, 96, case_rng(4, 0), treatment={"treated": 1, "dose_gy": 20, "interval_days": 60})
    high = generate_case(kind, 96, case_rng(4, 0), treatment={"treated": 1, "dose_gy": 60, "interval_days": 60})
    assert _count(high["labels_t1"], TUMOUR) < _count(low["labels_t1"], TUMOUR)
    # On naturally sampled cases, treated tumours grow less than untreated ones.
    growth = {0.0: [], 1.0: []}
    for i in range(24):
        case = generate_case(kind, 64, case_rng(8, i))
        ratio = _count(case["labels_t1"], TUMOUR) / _count(case["labels_t0"], TUMOUR)
        growth[case["treatment"]["treated"]].append(ratio)
    assert growth[0.0] and growth[1.0]
    assert np.median(growth[1.0]) < 0.6 * np.median(growth[0.0])


def _most_contacted_region(t0):
    near = ndi.binary_dilation(t0 == TUMOUR, iterations=2) & (t0 >= 2)
    return int(np.bincount(t0[near]).argmax())


def test_neighbours_are_displaced_outwards():
    switched_total = 0
    for i in range(6):
        pushed = generate_voronoi_case(96, case_rng(2, i), treatment=UNTREATED)
        overwrite = generate_voronoi_case(96, case_rng(2, i), treatment=UNTREATED, mass_effect=0.0)
        t0, t1, z1 = pushed["labels_t0"], pushed["labels_t1"], overwrite["labels_t1"]
        np.testing.assert_array_equal(t1 == TUMOUR, z1 == TUMOUR)  # same tumour, only the push differs

        # Without mass effect the tumour only overwrites: no tissue voxel changes tissue class.
        tissue = lambda lab: lab >= 2  # noqa: E731
        assert not (tissue(t0) & tissue(z1) & (t0 != z1)).any()

        # With it, tissue boundaries move, and outwards: the new class of a voxel is the t0 class
        # found 3 voxels closer to the tumour, not the one 3 voxels further out.
        switched = tissue(t0) & tissue(t1) & (t0 != t1)
        switched_total += int(switched.sum())
        centre = np.array(ndi.center_of_mass(t0 == TUMOUR))
        ys = np.argwhere(switched).astype(float)
        radial = (ys - centre) / np.linalg.norm(ys - centre, axis=1, keepdims=True)
        inward = np.clip(np.round(ys - 3 * radial).astype(int), 0, 95)
        outward = np.clip(np.round(ys + 3 * radial).astype(int), 0, 95)
        new = t1[switched]
        if len(new):
            assert (t0[tuple(inward.T)] == new).mean() > 0.75
            assert (t0[tuple(outward.T)] == new).mean() < 0.25

        # The region most in contact with the tumour moves away from it and keeps more of its
        # voxels than when the tumour simply overwrites it.
        k = _most_contacted_region(t0)
        c0 = np.array(ndi.center_of_mass(t0 == k))
        c1 = np.array(ndi.center_of_mass(t1 == k))
        assert (c1 - c0) @ (c0 - centre) > 0
        assert _count(t1, k) > _count(z1, k)
    assert switched_total > 100


# --------------------------------------------------------------------------------------------
# Vessel dataset
# --------------------------------------------------------------------------------------------
def _skeleton_end_points(mask):
    skel = skeletonize(mask)
    neighbours = ndi.convolve(skel.astype(int), np.ones((3, 3), int), mode="constant") - 1
    return int((skel & (neighbours == 1)).sum())


def test_vessel_tree_is_connected_and_branched():
    ends_tree, ends_tube = [], []
    for i in range(8):
        t0 = generate_vessel_case(96, case_rng(5, i))["labels_t0"]
        vessel = t0 == VESSEL
        assert ndi.label(vessel)[1] == 1, f"case {i}: the vessel class is not one connected component"
        ends_tree.append(_skeleton_end_points(vessel))
        tube = generate_vessel_case(96, case_rng(5, i), vessel_generations=0)["labels_t0"] == VESSEL
        ends_tube.append(_skeleton_end_points(tube))
    assert min(ends_tree) >= 3  # a tree with at least one bifurcation has >= 3 ends
    assert np.mean(ends_tree) >= np.mean(ends_tube) + 3


def test_vessels_thicken():
    ratios = []
    for i in range(8):
        case = generate_vessel_case(96, case_rng(6, i))
        ratios.append(_count(case["labels_t1"], VESSEL) / _count(case["labels_t0"], VESSEL))
        assert ndi.label(case["labels_t1"] == VESSEL)[1] == 1
    assert min(ratios) > 1.0
    assert np.mean(ratios) > 1.15


def _vessel_proximity_ratio(case):
    """Mean vessel distance of new tumour voxels / that of a ring of the same area around the tumour."""
    t0, t1 = case["labels_t0"], case["labels_t1"]
    tumour0 = t0 == TUMOUR
    new = (t1 == TUMOUR) & ~tumour0
    d_vessel = ndi.distance_transform_edt(t0 != VESSEL)
    d_tumour = ndi.distance_transform_edt(~tumour0)
    candidates = (t0 > 0) & ~tumour0 & (t0 != VESSEL)
    width = np.sort(d_tumour[candidates])[min(int(new.sum()), int(candidates.sum())) - 1]
    ring = candidates & (d_tumour <= width)
    return d_vessel[new].mean() / d_vessel[ring].mean()


def test_tumour_grows_along_vessels():
    boosted = [_vessel_proximity_ratio(generate_vessel_case(96, case_rng(3, i), treatment=UNTREATED))
               for i in range(8)]
    plain = [_vessel_proximity_ratio(generate_vessel_case(96, case_rng(3, i), treatment=UNTREATED,
                                                          vessel_boost=0.0)) for i in range(8)]
    assert np.mean(boosted) < 0.85
    assert np.mean(plain) > 0.9
    assert np.mean(boosted) < np.mean(plain) - 0.15


def test_tumour_is_seeded_next_to_a_vessel():
    for i in range(8):
        t0 = generate_vessel_case(96, case_rng(9, i))["labels_t0"]
        d_vessel = ndi.distance_transform_edt(t0 != VESSEL)
        assert d_vessel[t0 == TUMOUR].min() <= 1.5


# --------------------------------------------------------------------------------------------
# 3D
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["voronoi", "vessel"])
def test_3d_64_cube(kind):
    start = time.perf_counter()
    case = generate_case(kind, 64, case_rng(0, 0), ndim=3, treatment=UNTREATED)
    assert time.perf_counter() - start < 5.0
    t0, t1 = case["labels_t0"], case["labels_t1"]
    assert t0.shape == t1.shape == (64, 64, 64)
    assert set(np.unique(t0)) == set(range(5))
    assert _count(t1, TUMOUR) > _count(t0, TUMOUR)
    if kind == "vessel":
        assert ndi.label(t0 == VESSEL)[1] == 1


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def test_make_dataset_writes_readable_consistent_files(tmp_path):
    calls = []
    out = make_dataset("voronoi", 3, 64, 9, tmp_path / "ds", progress=lambda i, n: calls.append((i, n)))
    assert out == (tmp_path / "ds").absolute()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directory left
    with open(out / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert [r["case"] for r in rows] == ["case_0000", "case_0001", "case_0002"]
    for i, row in enumerate(rows):
        expected = generate_case("voronoi", 64, case_rng(9, i))
        for key in ("labels_t0", "labels_t1"):
            assert not row[key].startswith("/")
            image = sitk.ReadImage(str(out / row[key]))
            assert image.GetPixelID() == sitk.sitkUInt8
            assert image.GetSpacing() == (1.0, 1.0)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected[key])
        assert (row["kind"], row["size"], row["ndim"], row["seed"]) == ("voronoi", "64", "2", "9")
        for key, value in expected["treatment"].items():
            assert float(row[key]) == value
    description = json.loads((out / "dataset.json").read_text())
    assert description["class_names"] == class_names("voronoi")
    assert description["generator_version"]
    assert description["options"]["n_regions"] == 3
    loaded = load_dataset(out)
    assert len(loaded) == 3 and loaded[1]["treatment"] == generate_case("voronoi", 64, case_rng(9, 1))["treatment"]


def test_make_dataset_refuses_existing_directory_without_force(tmp_path):
    out = make_dataset("vessel", 1, 64, 0, tmp_path / "ds")
    (out / "extra.txt").write_text("keep me")
    with pytest.raises(OutputExistsError) as err:
        make_dataset("vessel", 1, 64, 1, out)
    assert str(out) in str(err.value) and "--force" in str(err.value)
    assert (out / "extra.txt").exists()
    make_dataset("vessel", 2, 64, 1, out, force=True)
    assert not (out / "extra.txt").exists()
    assert len(load_dataset(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_make_dataset_is_atomic_on_failure(tmp_path):
    def boom(i, n):
        if i == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        make_dataset("voronoi", 3, 64, 0, tmp_path / "ds", progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_reports_missing_files_and_columns(tmp_path):
    out = make_dataset("voronoi", 2, 64, 0, tmp_path / "ds")
    (out / "case_0001_t1.nii.gz").unlink()
    with pytest.raises(InputError, match="case_0001_t1.nii.gz"):
        load_dataset(out)
    manifest = out / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("dose_gy", "dose"))
    with pytest.raises(InputError, match="dose_gy"):
        load_dataset(out)
    with pytest.raises(InputError, match="manifest.csv"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [
    dict(size=63), dict(size=257), dict(size=64.0), dict(ndim=4), dict(ndim=1),
    dict(n_regions=0), dict(mass_effect=1.5), dict(no_such_option=1),
    dict(treatment={"treated": 0, "dose_gy": 60}), dict(treatment={"dose": 1}),
])
def test_invalid_parameters_raise(bad):
    args = {"size": 64, "ndim": 2}
    args.update({k: bad.pop(k) for k in list(bad) if k in args})
    with pytest.raises(ParameterError):
        generate_voronoi_case(args["size"], case_rng(0, 0), args["ndim"], **bad)


def test_invalid_dataset_arguments_raise(tmp_path):
    with pytest.raises(ParameterError):
        make_dataset("mri", 1, 64, 0, tmp_path / "a")
    with pytest.raises(ParameterError):
        make_dataset("vessel", 0, 64, 0, tmp_path / "b")
    with pytest.raises(ParameterError):
        make_dataset("vessel", 1, 300, 0, tmp_path / "c")
    with pytest.raises(ParameterError):
        class_names("mri")
    assert list(tmp_path.iterdir()) == []
