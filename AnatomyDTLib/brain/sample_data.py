"""The bundled sample case (``Resources/SampleData``) for the product demo.

One SYNTHETIC patient: a phantom tumour (:mod:`.phantom`) on the MNI ICBM 2009a atlas at 2 mm,
its baseline FLAIR-like image, its baseline segmentation (a 3D Slicer ``.seg.nrrd`` with named,
coloured segments) and a Stupp treatment plan. :func:`build_sample_case` regenerates it
(``python -m AnatomyDTLib.brain.sample_data --force``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError, OutputExistsError
from ..io import atomic_output, write_image, write_labelmap
from ..plan import stupp_plan
from ..schema import BRAIN_SCHEMA
from .atlas import resources_dir

SAMPLE_FILES = {
    "flair": "sample_flair.nii.gz",
    "segmentation": "sample_baseline.seg.nrrd",
    "plan": "sample_plan_stupp.json",
    "readme": "README.md",
}
SAMPLE_SEED = 2024
SAMPLE_RT_START_DAY = 28.0


class SampleDataMissingError(InputError, FileNotFoundError):
    """The bundled sample case is not installed."""


def sample_dir() -> Path:
    """``Resources/SampleData`` of the repository or installed extension."""
    return resources_dir() / "SampleData"


def sample_case() -> dict[str, Path]:
    """Paths of the bundled sample case by role: ``flair``, ``segmentation``, ``plan``, ``readme``.

    Raises:
        SampleDataMissingError: (an InputError and FileNotFoundError) a file is missing, with how to
            regenerate it.
    """
    directory = sample_dir()
    paths = {role: directory / name for role, name in SAMPLE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SampleDataMissingError(
            f"The bundled sample case is incomplete: missing {', '.join(missing)}. Reinstall the extension, or "
            "regenerate it from a repository checkout with 'python -m AnatomyDTLib.brain.sample_data --force'."
        )
    return paths


def _readme(patient, plan_text: str) -> str:
    b = patient.biology
    scan = patient.scans[0]
    return f"""# AnatomyDT sample case (SYNTHETIC)

This folder holds ONE synthetic patient for the AnatomyDT demo. Nothing here comes from a real
patient: the healthy anatomy is the MNI ICBM 2009a nonlinear symmetric atlas (2 mm, see
`../Atlas/NOTICE.txt` for its copyright notice, which applies to these derived files too), and the
tumour, its FLAIR signal and its mass effect were simulated by `AnatomyDTLib.brain.phantom`
(seed {SAMPLE_SEED}).

| file | content |
|---|---|
| `sample_flair.nii.gz` | baseline FLAIR-like image (float32, arbitrary units; WM 0.55, GM 0.75, CSF 0.08, lesion ~1.1) |
| `sample_baseline.seg.nrrd` | baseline segmentation, 3D Slicer segments: tumour, white_matter, grey_matter, lateral_ventricles |
| `sample_plan_stupp.json` | Stupp protocol from day {SAMPLE_RT_START_DAY:g}: 60 Gy in 30 x 2 Gy Mon-Fri + temozolomide (docs/plan.md) |

Baseline tumour (oedema included): {scan.tumour_ml:.1f} mL at LPS ({', '.join(f'{v:.0f}' for v in patient.site_mm)}) mm.
Hidden phantom biology: D_white {b.diffusion_wm_mm2_per_day:.3f} mm^2/day, white/grey ratio {b.wm_gm_ratio:.1f},
proliferation {b.proliferation_per_day:.3f} /day, LQ alpha {b.alpha_per_gy:.3f} /Gy.

Regenerate with `python -m AnatomyDTLib.brain.sample_data --force` (from a repository checkout).
"""


def build_sample_case(out_dir: str | Path | None = None, *, force: bool = False) -> dict[str, Path]:
    """Simulate the sample patient and write its files to ``out_dir`` (default ``Resources/SampleData``)."""
    from .phantom import case_rng, simulate_patient

    directory = Path(out_dir) if out_dir is not None else sample_dir()
    paths = {role: directory / name for role, name in SAMPLE_FILES.items()}
    if not force and any(p.exists() for p in paths.values()):
        raise OutputExistsError(f"Sample files exist in {directory}; pass --force to regenerate them.")
    patient = simulate_patient(case_rng(SAMPLE_SEED, 0), pattern="stupp", baseline_volume_ml=25.0)
    scan = patient.scans[0]
    write_image(paths["flair"], scan.flair, patient.geometry, force=force)
    write_labelmap(paths["segmentation"], scan.labels, patient.geometry, BRAIN_SCHEMA, force=force,
                   extra_segment_tags={"Source": "AnatomyDT synthetic phantom on MNI ICBM 2009a"})
    plan_text = json.dumps(stupp_plan(SAMPLE_RT_START_DAY).to_dict(), indent=2) + "\n"
    for role, text in (("plan", plan_text), ("readme", _readme(patient, plan_text))):
        with atomic_output(paths[role], force) as tmp:
            tmp.write_text(text)
    return paths


if __name__ == "__main__":  # pragma: no cover
    written = build_sample_case(force="--force" in sys.argv[1:])
    for role, path in written.items():
        print(f"{role:>12}: {path} ({path.stat().st_size / 1024:.0f} KiB)")
