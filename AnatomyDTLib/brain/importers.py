"""Convert public glioma datasets into AnatomyDT cohorts (``manifest.csv`` + 5-class labelmaps).

Supported layouts (file names exactly as distributed):

``ucsf-alptdg``  UCSF adult post-treatment diffuse glioma (longitudinal, 2 time points):
    ``<ID>/<ID>_time{1,2}_{t1,t1ce,t2,flair,seg}.nii.gz`` (240 x 240 x 155, 1 mm, SRI24). Labels
    1 necrosis / non-enhancing core, 2 oedema (SNFH), 3 enhancing, 4 resection cavity; masks are
    sometimes stored as floats (rounded here when within 1e-3 of an integer). The interval between
    the scans is not in the files: give ``--days-csv`` or the follow-up day is recorded as unknown.
``brats2021``    ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``; labels 1 NCR/NET,
    2 ED, 4 ET. One time point per case.
``brats2023``    GLI: ``BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f,seg}.nii.gz``; labels
    1 NETC, 2 SNFH, 3 ET. ``XXXXX`` is the patient and ``YYY`` the time point index.
``brats2024``    the post-treatment GLI release: same layout, plus label 4 = resection cavity (RC).
``lumiere``      ``Patient-NNN/week-NNN[-R]/{CT1,T1,T2,FLAIR}.nii.gz`` (optionally under ``Imaging/``)
    with automatic segmentations by DeepBraTumIA
    (``DeepBraTumIA-segmentation/native/segmentation/ct1_seg_mask.nii.gz``) or HD-GLIO-AUTO
    (``HD-GLIO-AUTO-segmentation/native/segmentation_CT1_origspace.nii.gz``). Published
    descriptions of these label values disagree, so the importer REQUIRES ``--labels`` (e.g.
    ``1=necrosis,2=enhancing,3=oedema``) confirming what each value is. Day = 7 x week relative to
    the first scan; a repeated week (``week-000-1``, ``week-000-2``) gets ``R - 1`` extra days so days
    stay strictly increasing (the week resolution is +-3.5 days anyway).

Every tumour sub-region (necrosis, non-enhancing, enhancing, oedema) becomes the ``tumour`` class;
the resection cavity becomes ``--cavity-class`` (default ``background``). These datasets carry no
white matter / cortex / ventricle labels, so rows are marked ``anatomy=missing``: complete them
with :mod:`.completion` before simulating. Images are referenced where they are (paths relative
to the output folder) unless ``copy_images`` is set; scans without a segmentation are skipped and
listed in ``cohort.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from ..errors import InputError
from ..io import Geometry, read_labelmap, write_labelmap
from ..schema import BRAIN_SCHEMA
from .cohort import MANIFEST_NAME, CohortWriter, write_manifest

DATASETS = ("ucsf-alptdg", "brats2021", "brats2023", "brats2024", "lumiere")
SUBREGIONS = ("background", "necrosis", "non_enhancing", "enhancing", "oedema", "cavity")
TUMOUR_SUBREGIONS = ("necrosis", "non_enhancing", "enhancing", "oedema")
_SUBREGION_SYNONYMS = {
    "bg": "background", "ncr": "necrosis", "net": "non_enhancing", "netc": "non_enhancing", "nec": "necrosis",
    "non-enhancing": "non_enhancing", "nonenhancing": "non_enhancing", "et": "enhancing", "enhancing tumour": "enhancing",
    "enhancing tumor": "enhancing", "contrast-enhancing": "enhancing", "ed": "oedema", "edema": "oedema",
    "snfh": "oedema", "rc": "cavity", "resection cavity": "cavity",
}
#: Documented label values of each dataset (``lumiere`` has none: they must be confirmed).
DEFAULT_LABELS = {
    "ucsf-alptdg": {1: "necrosis", 2: "oedema", 3: "enhancing", 4: "cavity"},
    "brats2021": {1: "necrosis", 2: "oedema", 4: "enhancing"},
    "brats2023": {1: "non_enhancing", 2: "oedema", 3: "enhancing"},
    "brats2024": {1: "non_enhancing", 2: "oedema", 3: "enhancing", 4: "cavity"},
    "lumiere": None,
}
LUMIERE_SEGMENTATIONS = {
    "deepbratumia": "DeepBraTumIA-segmentation/native/segmentation/ct1_seg_mask.nii.gz",
    "hd-glio-auto": "HD-GLIO-AUTO-segmentation/native/segmentation_CT1_origspace.nii.gz",
}
LUMIERE_LABEL_NOTE = (
    "LUMIERE's automatic segmentations use label values whose meaning is reported differently in "
    "published descriptions (e.g. DeepBraTumIA 1 necrosis, 2 contrast enhancement, 3 oedema; HD-GLIO-AUTO "
    "1 non-enhancing T2/FLAIR abnormality, 2 contrast enhancement). Check a few cases against the images and "
    "confirm the mapping with --labels, e.g. --labels 1=necrosis,2=enhancing,3=oedema.")


@dataclass
class Scan:
    """One scan found in a source layout (absolute paths)."""

    case: str
    order_key: tuple
    flair: Path
    segmentation: Path | None
    day: float = math.nan
    others: dict = field(default_factory=dict)   # t1 / t1ce / t2 paths
    source_id: str = ""


# --------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------


def parse_labels(text: str | dict | None) -> dict[int, str] | None:
    """``"1=necrosis,2=oedema"`` or a dict -> {value: sub-region}; sub-region names from :data:`SUBREGIONS`
    (synonyms such as NCR, ED, SNFH, ET, RC accepted; ``tumour`` means a tumour sub-region)."""
    if text is None or text == "":
        return None
    if isinstance(text, dict):
        items = list(text.items())
    else:
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                items = list(json.loads(stripped).items())
            except json.JSONDecodeError as exc:
                raise InputError(f"--labels is not valid JSON: {exc.msg}.") from exc
        else:
            items = []
            for part in stripped.split(","):
                if "=" not in part:
                    raise InputError(f"--labels entry {part!r} is not of the form value=sub-region (e.g. 2=oedema).")
                k, v = part.split("=", 1)
                items.append((k, v))
    result = {}
    for key, value in items:
        try:
            number = int(str(key).strip())
        except ValueError:
            raise InputError(f"--labels key {key!r} is not an integer label value.") from None
        name = str(value).strip().lower()
        name = _SUBREGION_SYNONYMS.get(name, name)
        if name in ("tumour", "tumor"):
            name = "non_enhancing"
        if name not in SUBREGIONS:
            raise InputError(f"--labels: {value!r} for value {number} is not a sub-region; use one of "
                             f"{list(SUBREGIONS)} (or NCR, NETC, ED, SNFH, ET, RC).")
        result[number] = name
    return result


def class_map_for(labels: dict[int, str], cavity_class: str) -> dict[int, str]:
    """Label value -> AnatomyDT class: tumour sub-regions -> tumour, cavity -> ``cavity_class``."""
    cavity = BRAIN_SCHEMA.names[BRAIN_SCHEMA.index(cavity_class)]
    if cavity == BRAIN_SCHEMA.tumour:
        raise InputError("--cavity-class cannot be the tumour class: a resection cavity is not tumour.")
    out = {0: BRAIN_SCHEMA.background}
    for value, sub in labels.items():
        out[value] = BRAIN_SCHEMA.tumour if sub in TUMOUR_SUBREGIONS else (cavity if sub == "cavity" else
                                                                            BRAIN_SCHEMA.background)
    return out


# --------------------------------------------------------------------------------------------
# Layout discovery
# --------------------------------------------------------------------------------------------


def _dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _find_ucsf(src: Path) -> list[Scan]:
    scans = []
    pattern = re.compile(r"^(?P<id>.+)_time(?P<t>\d+)_flair\.nii(\.gz)?$")
    for folder in _dirs(src):
        for flair in sorted(folder.glob(f"{folder.name}_time*_flair.nii*")):
            m = pattern.match(flair.name)
            if not m:
                continue
            stem = f"{folder.name}_time{m['t']}"
            ext = ".nii.gz" if flair.name.endswith(".gz") else ".nii"
            seg = folder / f"{stem}_seg{ext}"
            others = {k: folder / f"{stem}_{k}{ext}" for k in ("t1", "t1ce", "t2")}
            scans.append(Scan(folder.name, (int(m["t"]),), flair, seg if seg.is_file() else None,
                              others={k: v for k, v in others.items() if v.is_file()}, source_id=stem))
    return scans


def _find_brats2021(src: Path) -> list[Scan]:
    scans = []
    for folder in _dirs(src):
        if not folder.name.startswith("BraTS2021_"):
            continue
        flair = folder / f"{folder.name}_flair.nii.gz"
        if not flair.is_file():
            continue
        seg = folder / f"{folder.name}_seg.nii.gz"
        others = {k: folder / f"{folder.name}_{k}.nii.gz" for k in ("t1", "t1ce", "t2")}
        scans.append(Scan(folder.name, (0,), flair, seg if seg.is_file() else None, 0.0,
                          {k: v for k, v in others.items() if v.is_file()}, folder.name))
    return scans


def _find_brats_gli(src: Path) -> list[Scan]:
    scans = []
    pattern = re.compile(r"^BraTS-GLI-(?P<patient>\d+)-(?P<tp>\d+)$")
    for folder in _dirs(src):
        m = pattern.match(folder.name)
        if not m:
            continue
        flair = folder / f"{folder.name}-t2f.nii.gz"
        if not flair.is_file():
            continue
        seg = folder / f"{folder.name}-seg.nii.gz"
        others = {k: folder / f"{folder.name}-{s}.nii.gz" for k, s in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"))}
        scans.append(Scan(f"BraTS-GLI-{m['patient']}", (int(m["tp"]),), flair, seg if seg.is_file() else None,
                          others={k: v for k, v in others.items() if v.is_file()}, source_id=folder.name))
    return scans


def _find_lumiere(src: Path, segmentation: str) -> list[Scan]:
    root = src / "Imaging" if (src / "Imaging").is_dir() else src
    if segmentation not in LUMIERE_SEGMENTATIONS:
        raise InputError(f"--lumiere-segmentation must be one of {sorted(LUMIERE_SEGMENTATIONS)}, got {segmentation!r}.")
    relative = LUMIERE_SEGMENTATIONS[segmentation]
    week = re.compile(r"^week-(?P<w>\d+)(-(?P<r>\d+))?$")
    scans = []
    for patient in _dirs(root):
        if not patient.name.startswith("Patient-"):
            continue
        for session in _dirs(patient):
            m = week.match(session.name)
            if not m:
                continue
            flair = session / "FLAIR.nii.gz"
            if not flair.is_file():
                continue
            w, r = int(m["w"]), int(m["r"] or 1)
            seg = session / relative
            others = {k: session / f"{f}.nii.gz" for k, f in (("t1", "T1"), ("t1ce", "CT1"), ("t2", "T2"))}
            scans.append(Scan(patient.name, (w, r), flair, seg if seg.is_file() else None, 7.0 * w + (r - 1),
                              {k: v for k, v in others.items() if v.is_file()}, f"{patient.name}/{session.name}"))
    return scans


def _read_days_csv(path: str | os.PathLike) -> dict[tuple[str, int], float]:
    """``case,timepoint,day`` rows (timepoint 0-based), or ``case,interval_days`` (day of time point 1)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--days-csv '{p}' does not exist.")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    out = {}
    if {"case", "timepoint", "day"} <= cols:
        for row in rows:
            out[(row["case"].strip(), int(row["timepoint"]))] = float(row["day"])
    elif {"case", "interval_days"} <= cols:
        for row in rows:
            out[(row["case"].strip(), 1)] = float(row["interval_days"])
    else:
        raise InputError(f"--days-csv '{p}' needs columns case,timepoint,day (timepoint 0 = first scan) or "
                         f"case,interval_days; it has {sorted(cols)}.")
    return out


def find_scans(dataset: str, src: str | os.PathLike, *, lumiere_segmentation: str = "deepbratumia") -> list[Scan]:
    """Every scan of a source folder in ``dataset``'s layout (no file is read)."""
    root = Path(src)
    if not root.is_dir():
        raise InputError(f"--src '{root}' is not a folder; give the folder holding the {dataset} case folders.")
    if dataset == "ucsf-alptdg":
        scans = _find_ucsf(root)
    elif dataset == "brats2021":
        scans = _find_brats2021(root)
    elif dataset in ("brats2023", "brats2024"):
        scans = _find_brats_gli(root)
    elif dataset == "lumiere":
        scans = _find_lumiere(root, lumiere_segmentation)
    else:
        raise InputError(f"Unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    if not scans:
        examples = {"ucsf-alptdg": "<ID>/<ID>_time1_flair.nii.gz", "brats2021": "BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
                    "brats2023": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
                    "brats2024": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
                    "lumiere": "Patient-001/week-000-1/FLAIR.nii.gz"}
        raise InputError(f"No {dataset} scans found under '{root}'; expected files like {examples[dataset]}.")
    return scans


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _header_geometry(path: Path) -> tuple[Geometry, tuple[int, ...]]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"Cannot read '{path}': {str(exc).strip().splitlines()[-1]}") from exc
    geometry = Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return geometry, tuple(reversed(reader.GetSize()))


def import_cohort(dataset: str, src: str | os.PathLike, out: str | os.PathLike, *, labels=None,
                  cavity_class: str = "background", days_csv: str | os.PathLike | None = None,
                  lumiere_segmentation: str = "deepbratumia", copy_images: bool = False, force: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert ``src`` (in ``dataset``'s layout) into a cohort folder ``out``; returns ``out``.

    Args:
        labels: label value -> sub-region (see :func:`parse_labels`); default: the dataset's
            documented labels (:data:`DEFAULT_LABELS`); required for ``lumiere``.
        cavity_class: class receiving the resection cavity (a brain-schema class other than tumour).
        days_csv: optional CSV of scan days (UCSF-ALPTDG, BraTS 2023/2024 follow-ups).
        lumiere_segmentation: ``deepbratumia`` or ``hd-glio-auto``.
        copy_images: copy FLAIR/T1/T1ce/T2 into ``out`` instead of referencing them.

    Raises:
        InputError: unknown dataset, empty or misnamed source, labels not confirmed (LUMIERE),
            segmentation values outside the label map, segmentation not on its FLAIR's grid.
        OutputExistsError: ``out`` exists and is not empty, without ``force``.
    """
    if dataset not in DATASETS:
        raise InputError(f"Unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    label_map = parse_labels(labels) or DEFAULT_LABELS[dataset]
    if label_map is None:
        raise InputError(f"The {dataset} segmentations need --labels. {LUMIERE_LABEL_NOTE}")
    class_map = class_map_for(label_map, cavity_class)
    scans = find_scans(dataset, src, lumiere_segmentation=lumiere_segmentation)
    days = _read_days_csv(days_csv) if days_csv else {}
    by_case: dict[str, list[Scan]] = {}
    for scan in scans:
        by_case.setdefault(scan.case, []).append(scan)
    out_path = Path(out).absolute()
    skipped = []
    rows = []
    done = 0
    total = len(scans)
    with CohortWriter(out_path, force) as writer:
        for case in sorted(by_case):
            with_seg = []
            for scan in sorted(by_case[case], key=lambda s: s.order_key):
                if scan.segmentation is None:
                    skipped.append({"scan": scan.source_id, "reason": "no segmentation"})
                else:
                    with_seg.append(scan)
            first_day = with_seg[0].day if with_seg and not math.isnan(with_seg[0].day) else None
            for k, scan in enumerate(with_seg):
                day = scan.day - first_day if first_day is not None else (0.0 if k == 0 else math.nan)
                if (case, k) in days:
                    day = days[(case, k)]
                rows.append(_convert_scan(writer.tmp, out_path, case, k, day, scan, class_map, dataset, copy_images))
                done += 1
                if progress is not None:
                    progress(done, total)
        if not rows:
            raise InputError(f"None of the {len(scans)} scans under '{src}' has a segmentation; nothing to import.")
        write_manifest(writer.tmp / MANIFEST_NAME, rows, extra_columns=("t1", "t1ce", "t2", "source_id"))
        description = {
            "dataset": dataset, "source": str(Path(src).absolute()), "label_values": {str(k): v for k, v in
                                                                                      label_map.items()},
            "class_map": {str(k): v for k, v in class_map.items()}, "cavity_class": cavity_class,
            "anatomy": "missing: only tumour (and the cavity class) are labelled; complete with "
                       "AnatomyDTLib.brain.completion", "images": "copied" if copy_images else "referenced in place",
            "days": "from --days-csv" if days_csv else ("7 x week" if dataset == "lumiere" else
                                                       "0 for the first scan, unknown (empty) afterwards"),
            "skipped": skipped, "scans": len(rows), "patients": len({r['case'] for r in rows}),
        }
        if dataset == "lumiere":
            description["lumiere_segmentation"] = lumiere_segmentation
        (writer.tmp / "cohort.json").write_text(json.dumps(description, indent=2) + "\n")
    return out_path


def _convert_scan(tmp: Path, final: Path, case: str, k: int, day: float, scan: Scan, class_map: dict, dataset: str,
                  copy_images: bool) -> dict:
    try:
        volume = read_labelmap(scan.segmentation, BRAIN_SCHEMA, class_map=class_map)
    except InputError as exc:
        raise InputError(f"{scan.source_id}: {exc} For import-cohort, state what each label value is with --labels "
                         f"(value=sub-region, e.g. --labels 1=necrosis,2=oedema,3=enhancing).") from exc
    flair_geometry, flair_shape = _header_geometry(scan.flair)
    volume.geometry.check_matches(flair_geometry, f"segmentation of {scan.source_id} vs its FLAIR",
                                  shape=volume.shape, other_shape=flair_shape)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", case)
    seg_rel = f"{safe}/tp{k}_seg.nii.gz"
    write_labelmap(tmp / seg_rel, volume.labels, volume.geometry, BRAIN_SCHEMA)
    paths = {"image": scan.flair, **scan.others}
    row = {"case": case, "timepoint": k, "day": day, "segmentation": seg_rel, "plan": "", "anatomy": "missing",
           "source": dataset, "source_id": scan.source_id,
           "tumour_ml": round(float((volume.labels == BRAIN_SCHEMA.tumour_index).sum()) *
                              volume.geometry.voxel_volume_ml, 3)}
    for key, path in paths.items():
        if copy_images:
            name = "flair" if key == "image" else key
            rel = f"{safe}/tp{k}_{name}.nii.gz" if path.name.endswith(".gz") else f"{safe}/tp{k}_{name}.nii"
            shutil.copyfile(path, tmp / rel)
            row[key] = rel
        else:
            row[key] = Path(os.path.relpath(path.absolute(), final)).as_posix()
    return row
