"""Table 1 (methods) and Table 2 (ablations) of the paper from per-case evaluation rows.

Input rows are those of ``anatomydt evaluate`` (``per_case.csv`` / ``fold_k/test_cases.csv``):
one row per (method, test case) with ``fold``, ``model`` and the ``dice_*``, ``hd95_*``,
``cldice_*`` columns. Scores are summarised exactly as :func:`AnatomyDTLib.models.evaluation.summarise`
does: overall = mean over the foreground classes per case, mean per fold, then mean ± sample sd
(ddof 1) over the fold means. DSC and clDice in %, HD95 in mm (pixels for the synthetic sets).

The paper's numbers (seed 001, Tables 1–2) are printed next to ours for reference; they were
measured on the authors' own synthetic data, not on ours (docs/results.md).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..models.evaluation import summarise
from . import LABELS

#: Table 1 of the paper: (DSC mean, sd, HD95 mean, sd) per dataset and method.
PAPER_TABLE1 = {
    "voronoi": {"unet": (66.08, 9.82, 29.48, 7.67), "convlstm": (69.86, 3.96, 26.16, 2.38),
                "neuralode": (69.01, 11.43, 28.18, 6.73), "fisher-kpp": (71.57, 0.34, 38.11, 0.30),
                "cross-diffusion": (71.53, 0.35, 38.11, 0.29), "anatomy-dt": (95.70, 0.30, 1.56, 0.14)},
    "vessel": {"unet": (60.31, 2.16, 36.70, 2.84), "convlstm": (59.62, 4.09, 37.11, 3.22),
               "neuralode": (62.90, 3.40, 33.98, 4.12), "fisher-kpp": (69.04, 0.68, 27.50, 1.17),
               "cross-diffusion": (66.32, 0.94, 37.63, 1.65), "anatomy-dt": (71.14, 0.25, 19.35, 1.12)},
}

#: Table 2 of the paper (dataset not named; its full-model row equals the Voronoi result).
#: run name -> (spatial alpha, Growth CNN, topology loss, DSC, sd, HD95, sd)
ABLATIONS = {
    "ablation-no-spatial": (False, True, False, 64.82, 4.99, 40.27, 2.22),
    "ablation-no-growth": (True, False, False, 70.53, 0.45, 20.23, 0.29),
    "ablation-no-growth-topo": (True, False, True, 70.50, 0.44, 20.23, 0.30),
    "anatomy-dt": (True, True, True, 95.70, 0.30, 1.56, 0.14),
}

SUMMARY_COLUMNS = ["method", "label", "dsc_mean", "dsc_sd", "hd95_mean", "hd95_sd", "cldice_mean", "cldice_sd",
                   "tumour_dsc_mean", "tumour_dsc_sd", "folds", "test_cases", "paper_dsc", "paper_dsc_sd",
                   "paper_hd95", "paper_hd95_sd", "epochs", "seconds"]


def method_summary(rows: list[dict], class_names: list[str], background_index: int, methods: list[str],
                   tumour_name: str = "tumour") -> dict[str, dict]:
    """{method: {dsc_mean, dsc_sd, hd95_mean, ..., folds, test_cases}} for the methods present in ``rows``."""
    present = [m for m in methods if any(r["model"] == m for r in rows)]
    out = {}
    for m in present:
        mine = [r for r in rows if r["model"] == m]
        entries = {(e["scope"], e["metric"]): e for e in summarise(mine, class_names, background_index, models=(m,))}

        def pick(scope, metric, scale):
            e = entries.get((scope, metric))
            return (e["mean"] * scale, e["sd"] * scale) if e else (math.nan, math.nan)

        dsc, hd, cl = pick("overall", "dice", 100), pick("overall", "hd95", 1), pick("overall", "cldice", 100)
        tumour = pick(tumour_name, "dice", 100) if tumour_name in class_names else (math.nan, math.nan)
        out[m] = {"dsc_mean": dsc[0], "dsc_sd": dsc[1], "hd95_mean": hd[0], "hd95_sd": hd[1],
                  "cldice_mean": cl[0], "cldice_sd": cl[1], "tumour_dsc_mean": tumour[0], "tumour_dsc_sd": tumour[1],
                  "folds": len({int(r["fold"]) for r in mine}), "test_cases": len(mine)}
    return out


def _pm(mean: float, sd: float, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _cells(r: dict, dsc: str, hd95: str) -> str:
    """The markdown cells shared by both tables, from DSC on (DSC and HD95 given as text)."""
    secs = "" if math.isnan(r["seconds"]) else f"{r['seconds']:.0f}"
    return (f"{dsc} | {hd95} | {_pm(r['cldice_mean'], r['cldice_sd'])} | {_pm(r['tumour_dsc_mean'], r['tumour_dsc_sd'])} | "
            f"{_pm(r['paper_dsc'], r['paper_dsc_sd'])} | {_pm(r['paper_hd95'], r['paper_hd95_sd'])} | {r['epochs']} | "
            f"{secs} |")


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in columns})


def _best(rows: list[dict], key: str, lower: bool) -> float | None:
    values = [r[key] for r in rows if r["method"] != "identity" and not math.isnan(r[key])]
    if not values:
        return None
    return min(values) if lower else max(values)


def write_table1(out_dir, summary: dict[str, dict], kind: str, seconds: dict[str, float] | None = None,
                 order: list[str] | None = None, epochs: dict[str, str] | None = None) -> tuple[Path, Path]:
    """table1.csv and table1.md: DSC, HD95, clDice (ours) next to the paper's Table 1 for ``kind``.

    ``seconds``: training + test wall time per method; ``epochs``: epochs run per fold (text).
    """
    out = Path(out_dir)
    paper = PAPER_TABLE1.get(kind, {})
    seconds = seconds or {}
    epochs = epochs or {}
    order = order or list(summary)
    rows = []
    for m in order:
        if m not in summary:
            continue
        p = paper.get(m, (math.nan,) * 4)
        rows.append({"method": m, "label": LABELS.get(m, m), **summary[m], "paper_dsc": p[0], "paper_dsc_sd": p[1],
                     "paper_hd95": p[2], "paper_hd95_sd": p[3], "epochs": epochs.get(m, ""),
                     "seconds": float(seconds.get(m, math.nan))})
    _write_csv(out / "table1.csv", rows, SUMMARY_COLUMNS)
    best_dsc, best_hd = _best(rows, "dsc_mean", False), _best(rows, "hd95_mean", True)

    def bold(text, value, best):
        return f"**{text}**" if best is not None and value == best and rows and len(rows) > 1 else text

    lines = ["| method | DSC (%) | HD95 (mm) | clDice (%) | tumour DSC (%) | paper DSC (%) | paper HD95 | epochs | "
             "wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | " + _cells(r, bold(_pm(r["dsc_mean"], r["dsc_sd"]), r["dsc_mean"], best_dsc),
                                                   bold(_pm(r["hd95_mean"], r["hd95_sd"]), r["hd95_mean"], best_hd)))
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    return out / "table1.md", out / "table1.csv"


def write_table2(out_dir, summary: dict[str, dict], seconds: dict[str, float] | None = None,
                 epochs: dict[str, str] | None = None) -> tuple[Path, Path]:
    """table2.csv and table2.md: the ablation rows (spatial α, Growth CNN, topology loss) that were run."""
    out = Path(out_dir)
    seconds = seconds or {}
    epochs = epochs or {}
    rows = []
    for name, (spatial, growth, topo, pd, pds, ph, phs) in ABLATIONS.items():
        if name not in summary:
            continue
        rows.append({"run": name, "spatial_alpha": spatial, "growth_cnn": growth, "topology_loss": topo,
                     **{k: summary[name][k] for k in ("dsc_mean", "dsc_sd", "hd95_mean", "hd95_sd", "cldice_mean",
                                                      "cldice_sd", "tumour_dsc_mean", "tumour_dsc_sd", "folds",
                                                      "test_cases")},
                     "paper_dsc": pd, "paper_dsc_sd": pds, "paper_hd95": ph, "paper_hd95_sd": phs,
                     "epochs": epochs.get(name, ""), "seconds": float(seconds.get(name, math.nan))})
    columns = ["run", "spatial_alpha", "growth_cnn", "topology_loss", "dsc_mean", "dsc_sd", "hd95_mean", "hd95_sd",
               "cldice_mean", "cldice_sd", "tumour_dsc_mean", "tumour_dsc_sd", "folds", "test_cases", "paper_dsc",
               "paper_dsc_sd", "paper_hd95", "paper_hd95_sd", "epochs", "seconds"]
    _write_csv(out / "table2.csv", rows, columns)
    mark = {True: "✓", False: "✗"}
    lines = ["| spatial α | Growth CNN | topology loss | DSC (%) | HD95 (mm) | clDice (%) | tumour DSC (%) | "
             "paper DSC (%) | paper HD95 | epochs | wall time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {mark[r['spatial_alpha']]} | {mark[r['growth_cnn']]} | {mark[r['topology_loss']]} | "
                     + _cells(r, _pm(r["dsc_mean"], r["dsc_sd"]), _pm(r["hd95_mean"], r["hd95_sd"])))
    (out / "table2.md").write_text("\n".join(lines) + "\n")
    return out / "table2.md", out / "table2.csv"
