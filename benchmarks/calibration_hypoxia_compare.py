"""Per-patient comparison of calibration with and without an assumed hypoxia (OER 2.25) on the 38
held-out phantom patients, from the per-patient tables in docs/results/ (docs/calibration.md,
"Hypoxic radioresistance"): a table of the forecasts that differ, then means, medians, counts.

    python benchmarks/calibration_hypoxia_compare.py

Without hypoxia: docs/results/calibration_carried (the default run), with the 12 hard cases and the
7 patients whose hypoxia run met the 75 s limit taken from reruns on the same machine
(calibration_hypoxia_baseline_hard; calibration_hypoxia_reruns_200s/none at 200 s). With hypoxia:
calibration_hypoxia, the same 7 from calibration_hypoxia_reruns_200s/oer_2.25.
"""
import csv
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
HARD = 0.65  # a hard case: no change scores at most this tumour DSC


def load(*tables: Path) -> dict:
    """case -> row of the per-patient tables, later tables replacing earlier rows."""
    rows: dict = {}
    for table in tables:
        with open(table) as fh:
            rows.update({r["case"]: r for r in csv.DictReader(fh)})
    return rows


def number(row: dict, column: str) -> float:
    return float(row[column])


def main() -> None:
    base = load(RESULTS / "calibration_carried" / "per_patient.csv",
                RESULTS / "calibration_hypoxia_baseline_hard" / "per_patient.csv",
                RESULTS / "calibration_hypoxia_reruns_200s" / "none" / "per_patient.csv")
    new = load(RESULTS / "calibration_hypoxia" / "per_patient.csv",
               RESULTS / "calibration_hypoxia_reruns_200s" / "oer_2.25" / "per_patient.csv")
    cases = sorted(base)
    dice = lambda rows: [number(rows[c], "calibrated_dice") for c in cases]  # noqa: E731
    before, after = dice(base), dice(new)
    print("| case | pattern | calibrated DSC | with hypoxia | no change | volume error (mL) | with hypoxia |")
    print("|---|---|---|---|---|---|---|")
    for c, a, b in zip(cases, before, after):
        if abs(a - b) > 0.005:
            print(f"| {c} | {new[c]['pattern']} | {a:.3f} | {b:.3f} | {number(new[c], 'no_change_dice'):.3f} | "
                  f"{number(base[c], 'calibrated_volume_error_ml'):+.2f} | "
                  f"{number(new[c], 'calibrated_volume_error_ml'):+.2f} |")
    mean, median, sd = statistics.mean, statistics.median, statistics.stdev
    print(f"mean {mean(before):.3f} ± {sd(before):.3f} -> {mean(after):.3f} ± {sd(after):.3f}; "
          f"median {median(before):.3f} -> {median(after):.3f}")
    diffs = [b - a for a, b in zip(before, after)]
    print("better", sum(x > 0.005 for x in diffs), "worse", sum(x < -0.005 for x in diffs),
          "level", sum(abs(x) <= 0.005 for x in diffs))
    for label, column, transform in (("|vol err|", "calibrated_volume_error_ml", abs), ("hd95", "calibrated_hd95", float)):
        print(f"median {label} {median(transform(number(base[c], column)) for c in cases):.2f} -> "
              f"{median(transform(number(new[c], column)) for c in cases):.2f}")
    print("time limited", *(sum(rows[c]["stop_reason"] == "time limit" for c in cases) for rows in (base, new)))
    hard = [i for i, c in enumerate(cases) if number(new[c], "no_change_dice") <= HARD]
    print("hard", len(hard), f"{mean(before[i] for i in hard):.3f} -> {mean(after[i] for i in hard):.3f}",
          sum(after[i] >= 0.8 for i in hard))


if __name__ == "__main__":
    main()
