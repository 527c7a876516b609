"""Per-patient comparison of two calibration runs of ``benchmarks/calibration_phantom.py`` (their
``per_patient.csv``): the forecasts that differ, then means, medians, counts and the hard cases.

    python benchmarks/calibration_compare.py --base RUN_A/per_patient.csv --new RUN_B/per_patient.csv \
        --label "fitted half-life"

``--base`` and ``--new`` take one or more tables each; a later table replaces the rows of an earlier
one (reruns of some patients). Only patients in both runs are compared. A hard case is one where
no change scores a tumour DSC of at most 0.65 (as in calibration_phantom.py).
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

HARD = 0.65   # a hard case: no change scores at most this tumour DSC
TARGET = 0.80
LEVEL = 0.005  # a DSC change below this is "level"


def load(*tables: Path) -> dict:
    """case -> row of the per-patient tables, later tables replacing earlier rows."""
    rows: dict = {}
    for table in tables:
        with open(table) as fh:
            rows.update({r["case"]: r for r in csv.DictReader(fh)})
    return rows


def number(row: dict, column: str) -> float:
    return float(row[column])


def changed_table(cases, base, new, label: str) -> list[str]:
    lines = [f"| case | pattern | calibrated DSC | {label} | no change | volume error (mL) | {label} |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        a, b = number(base[c], "calibrated_dice"), number(new[c], "calibrated_dice")
        if abs(a - b) > LEVEL:
            lines.append(f"| {c} | {new[c]['pattern']} | {a:.3f} | {b:.3f} | {number(new[c], 'no_change_dice'):.3f} | "
                         f"{number(base[c], 'calibrated_volume_error_ml'):+.2f} | "
                         f"{number(new[c], 'calibrated_volume_error_ml'):+.2f} |")
    return lines


def summary_lines(cases, base, new) -> list[str]:
    mean, median, sd = statistics.mean, statistics.median, statistics.stdev
    before = [number(base[c], "calibrated_dice") for c in cases]
    after = [number(new[c], "calibrated_dice") for c in cases]
    no_change = [number(new[c], "no_change_dice") for c in cases]
    diffs = [b - a for a, b in zip(before, after)]
    lines = [f"{len(cases)} patients: mean {mean(before):.3f} ± {sd(before):.3f} -> {mean(after):.3f} ± "
             f"{sd(after):.3f} (no change {mean(no_change):.3f}); median {median(before):.3f} -> {median(after):.3f}",
             f"better {sum(x > LEVEL for x in diffs)}, worse {sum(x < -LEVEL for x in diffs)}, "
             f"level {sum(abs(x) <= LEVEL for x in diffs)}"]
    for label, column, transform in (("|vol err|", "calibrated_volume_error_ml", abs), ("hd95", "calibrated_hd95", float)):
        lines.append(f"median {label} {median(transform(number(base[c], column)) for c in cases):.2f} -> "
                     f"{median(transform(number(new[c], column)) for c in cases):.2f}")
    lines.append("time limited: " + " -> ".join(str(sum(rows[c]["stop_reason"] == "time limit" for c in cases))
                                                for rows in (base, new)))
    hard = [i for i, c in enumerate(cases) if no_change[i] <= HARD]
    if hard:
        lines.append(f"hard cases (no change <= {HARD}): {len(hard)}; mean {mean(before[i] for i in hard):.3f} -> "
                     f"{mean(after[i] for i in hard):.3f} (no change {mean(no_change[i] for i in hard):.3f}); "
                     f">= {TARGET}: {sum(before[i] >= TARGET for i in hard)} -> {sum(after[i] >= TARGET for i in hard)}")
    return lines


def compare(base_tables, new_tables, label: str) -> str:
    base, new = load(*base_tables), load(*new_tables)
    cases = sorted(set(base) & set(new))
    if len(cases) < 2:
        raise SystemExit(f"the runs share {len(cases)} patients; compare runs of the same cohort")
    return "\n".join(changed_table(cases, base, new, label) + summary_lines(cases, base, new))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, nargs="+", required=True, metavar="CSV")
    parser.add_argument("--new", type=Path, nargs="+", required=True, metavar="CSV")
    parser.add_argument("--label", default="new", help="column title of the new run")
    args = parser.parse_args(argv)
    print(compare(args.base, args.new, args.label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
