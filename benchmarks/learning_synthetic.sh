#!/usr/bin/env bash
# Cross-validated accuracy of the learned Anatomy-DT model on the synthetic benchmarks (a measurement,
# not a test): the numbers reported in docs/learning.md come from exactly these commands.
#
#   bash benchmarks/learning_synthetic.sh [OUT_DIR] [NPROC]
#
# OUT_DIR (default ./learning_results) receives the datasets and one evaluation directory per run;
# NPROC (default 2) processes train data-parallel (DDP, gloo on CPU) via torch.distributed.run.
# Each evaluation writes summary.md / summary.csv / per_case.csv and fold_k/metrics.csv (per-epoch
# wall time). Runs are resumable: re-running the script reuses finished folds (--resume).
# On 2 CPU cores one full-model fold takes ~8-9 minutes; the whole script ~6-7 hours.
set -euo pipefail

OUT=${1:-learning_results}
NPROC=${2:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export ANATOMYDT_NO_PROGRESS=${ANATOMYDT_NO_PROGRESS:-1}
mkdir -p "$OUT"

run() {  # run NAME DATA CONFIG
    python -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${PORT:-29555}" \
        -m AnatomyDTLib evaluate --data "$2" --folds 5 --config "$3" --out "$OUT/$1" --device cpu --resume
}

for kind in voronoi vessel; do
    [ -f "$OUT/data_$kind/manifest.csv" ] || \
        python -m AnatomyDTLib make-dataset "$kind" --n 200 --size 128 --seed 0 --out "$OUT/data_$kind"
done

run voronoi_full  "$OUT/data_voronoi" "$HERE/configs/voronoi.json"
run vessel_full   "$OUT/data_vessel"  "$HERE/configs/vessel.json"

# Table 2 ablations on Voronoi (switches: model.spatial_alpha, model.growth_cnn, loss.lambda_topo)
ablation() {  # ablation NAME SPATIAL CNN TOPO
    python - "$HERE/configs/voronoi.json" "$OUT/$1.json" "$2" "$3" "$4" <<'EOF'
import json, sys
src, dst, spatial, cnn, topo = sys.argv[1:]
cfg = json.load(open(src))
cfg["model"]["spatial_alpha"] = spatial == "1"
cfg["model"]["growth_cnn"] = cnn == "1"
cfg["loss"]["lambda_topo"] = 1.0 if topo == "1" else 0.0
json.dump(cfg, open(dst, "w"), indent=2)
EOF
    run "$1" "$OUT/data_voronoi" "$OUT/$1.json"
}
ablation voronoi_scalar_cnn_notopo   0 1 0
ablation voronoi_spatial_nocnn_notopo 1 0 0
ablation voronoi_spatial_nocnn_topo   1 0 1
