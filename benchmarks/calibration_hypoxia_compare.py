"""Per-patient comparison of calibration with and without an assumed hypoxia (OER 2.25) on the 38
held-out phantom patients, from the per-patient tables in docs/results/ (docs/calibration.md,
"Hypoxic radioresistance"): a table of the forecasts that differ, then means, medians, counts.

    python benchmarks/calibration_hypoxia_compare.py

Without hypoxia: docs/results/calibration_carried (the default run), with the 12 hard cases and the
7 patients whose hypoxia run met the 75 s limit taken from reruns on the same machine
(calibration_hypoxia_baseline_hard; calibration_hypoxia_reruns_200s/none at 200 s). With hypoxia:
calibration_hypoxia, the same 7 from calibration_hypoxia_reruns_200s/oer_2.25. The comparison
itself is benchmarks/calibration_compare.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_compare import compare  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    print(compare([RESULTS / "calibration_carried" / "per_patient.csv",
                   RESULTS / "calibration_hypoxia_baseline_hard" / "per_patient.csv",
                   RESULTS / "calibration_hypoxia_reruns_200s" / "none" / "per_patient.csv"],
                  [RESULTS / "calibration_hypoxia" / "per_patient.csv",
                   RESULTS / "calibration_hypoxia_reruns_200s" / "oer_2.25" / "per_patient.csv"],
                  "with hypoxia"))
