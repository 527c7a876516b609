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
load = lambda f: {r["case"]: r for r in csv.DictReader(open(f))}
base = load(RESULTS / "calibration_carried" / "per_patient.csv")
base.update(load(RESULTS / "calibration_hypoxia_baseline_hard" / "per_patient.csv"))  # hard cases, rerun
base.update(load(RESULTS / "calibration_hypoxia_reruns_200s" / "none" / "per_patient.csv"))
new = load(RESULTS / "calibration_hypoxia" / "per_patient.csv")
new.update(load(RESULTS / "calibration_hypoxia_reruns_200s" / "oer_2.25" / "per_patient.csv"))
common = sorted(base)
d = lambda r: float(r["calibrated_dice"])
rows = []
for c in common:
    a, b = d(base[c]), d(new[c])
    if abs(a - b) > 0.005:
        rows.append((c, new[c]["pattern"], a, b, float(new[c]["no_change_dice"]), float(base[c]["calibrated_volume_error_ml"]), float(new[c]["calibrated_volume_error_ml"])))
print("| case | pattern | calibrated DSC | with hypoxia | no change | volume error (mL) | with hypoxia |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:+.2f} | {r[6]:+.2f} |")
A = [d(base[c]) for c in common]; B = [d(new[c]) for c in common]
sd = statistics.stdev
print(f"mean {statistics.mean(A):.3f} ± {sd(A):.3f} -> {statistics.mean(B):.3f} ± {sd(B):.3f}; median {statistics.median(A):.3f} -> {statistics.median(B):.3f}")
diffs = [b - a for a, b in zip(A, B)]
print("better", sum(x > 0.005 for x in diffs), "worse", sum(x < -0.005 for x in diffs), "level", sum(abs(x) <= 0.005 for x in diffs))
ve = lambda r: abs(float(r["calibrated_volume_error_ml"]))
print(f"median |vol err| {statistics.median(ve(base[c]) for c in common):.2f} -> {statistics.median(ve(new[c]) for c in common):.2f}")
hd = lambda r: float(r["calibrated_hd95"])
print(f"median hd95 {statistics.median(hd(base[c]) for c in common):.2f} -> {statistics.median(hd(new[c]) for c in common):.2f}")
tl = lambda t: sum(t[c]["stop_reason"] == "time limit" for c in common)
print("time limited", tl(base), tl(new))
hard = [c for c in common if float(new[c]["no_change_dice"]) <= 0.65]
print("hard", len(hard), f"{statistics.mean(d(base[c]) for c in hard):.3f} -> {statistics.mean(d(new[c]) for c in hard):.3f}", sum(d(new[c]) >= 0.8 for c in hard))
