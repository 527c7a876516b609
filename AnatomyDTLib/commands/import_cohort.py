"""``anatomydt import-cohort``: convert a public glioma dataset into an AnatomyDT cohort.

    anatomydt import-cohort {ucsf-alptdg,brats2021,brats2023,brats2024,lumiere} --src DIR --out DIR
        [--labels 1=necrosis,2=oedema,...] [--cavity-class background] [--days-csv FILE]
        [--lumiere-segmentation deepbratumia|hd-glio-auto] [--copy-images] [--force]

Writes 5-class labelmaps (tumour sub-regions merged into 'tumour', the resection cavity into
--cavity-class) and manifest.csv with anatomy=missing (complete it with atlas registration).
LUMIERE needs --labels to confirm what its label values mean. See docs/brain_data.md.
"""

from __future__ import annotations

from ._common import add_force_argument, progress_bar_count

NAME = "import-cohort"
HELP = "Convert UCSF-ALPTDG / BraTS 2021, 2023, 2024 / LUMIERE folders into a cohort (manifest.csv + labelmaps)."


def add_arguments(parser) -> None:
    from ..brain.importers import DATASETS

    parser.add_argument("dataset", choices=DATASETS, help="source layout")
    parser.add_argument("--src", required=True, help="folder holding the dataset's case folders")
    parser.add_argument("--out", required=True, help="output cohort folder (empty or absent unless --force)")
    parser.add_argument("--labels", help="label value -> sub-region (necrosis, non_enhancing, enhancing, oedema, "
                                         "cavity, background), e.g. '1=necrosis,2=oedema,4=enhancing'; "
                                         "default: the dataset's documented labels; required for lumiere")
    parser.add_argument("--cavity-class", default="background",
                        help="class of the resection cavity (default background)")
    parser.add_argument("--days-csv", help="CSV with case,timepoint,day (or case,interval_days) giving scan days")
    parser.add_argument("--lumiere-segmentation", default="deepbratumia", choices=("deepbratumia", "hd-glio-auto"),
                        help="which LUMIERE automatic segmentation to convert (default deepbratumia)")
    parser.add_argument("--copy-images", action="store_true",
                        help="copy the images into --out instead of referencing them where they are")
    add_force_argument(parser)


def run(args) -> int:
    from ..brain.importers import find_scans, import_cohort

    total = len(find_scans(args.dataset, args.src, lumiere_segmentation=args.lumiere_segmentation))
    with progress_bar_count(total, "scans") as progress:
        out = import_cohort(args.dataset, args.src, args.out, labels=args.labels, cavity_class=args.cavity_class,
                            days_csv=args.days_csv, lumiere_segmentation=args.lumiere_segmentation,
                            copy_images=args.copy_images, force=args.force, progress=progress)
    print(f"imported {args.dataset} from {args.src} into {out} (manifest.csv, cohort.json; anatomy=missing)")
    return 0
