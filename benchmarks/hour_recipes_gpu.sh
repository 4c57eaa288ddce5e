#!/usr/bin/env bash
# The CPU hour's recipes, searched on one GPU: each arm trains exactly the epochs that the
# 2-core CPU fits into its hour (the CPU's step cost per backbone and input size, measured on the
# CPU and written beside each arm below), all arms at once, each scored by offline_pretrained.py
# (val Dice on the held-out part of train/, which is what a recipe is chosen by; test Dice).
#
#   bash benchmarks/hour_recipes_gpu.sh [DATA_ROOT] [WEIGHTS_DIR] [OUT]            # ISIC
#   DATASET=drive bash benchmarks/hour_recipes_gpu.sh [DATA_ROOT] [WEIGHTS_DIR] [OUT]  # DRIVE
#
# WEIGHTS_DIR, when given, holds lite0.pth, lite1.pth, lite2.pth: the packaged ImageNet weights
# saved as the backbone's own state dict (where the medseg[lite] packages cannot be installed);
# otherwise the packages' files are used. Each arm's log is OUT/<arm>.log.
set -u
DATA_ROOT=${1:-../shared/data}
WEIGHTS=${2:-}
OUT=${3:-runs/hour-recipes-gpu}
HERE=$(dirname "$0")
mkdir -p "$OUT"

# name arm image_size epochs seed (arm: offline_pretrained.py's); ISIC's epochs from the CPU's seconds a step (AMD EPYC, bf16,
# batch 16): Lite0 1.2 s at 192 (28 epochs fit the hour), 1.6 s at 224 (20); Lite1 1.1-1.2 s at
# 192 (27); Lite2 1.35 s at 192 (24), 1.8 s at 224 (18).
ISIC_ARMS="
lite0 lite0+ema 192 28 0
lite0-s1 lite0+ema 192 28 1
lite1 lite1+ema 192 27 0
lite2 lite2+ema 192 24 0
lite2-s1 lite2+ema 192 24 1
lite2-224 lite2+ema 224 18 0
lite0-224 lite0+ema 224 20 0
lite2-50ep lite2+ema 192 50 0
"
# DRIVE (256-pixel patches, 6 steps an epoch): Lite0 2.26 s a step, so 134 epochs take 30 min
# and 250 the hour; Lite2 about 1.3 times that (190 epochs).
DRIVE_ARMS="
lite0-134 lite0 256 134 0
lite0-250 lite0 256 250 0
lite0-250-s1 lite0 256 250 1
lite2-190 lite2 256 190 0
"
DATASET=${DATASET:-isic}
[ "$DATASET" = drive ] && DEFAULT_ARMS=$DRIVE_ARMS || DEFAULT_ARMS=$ISIC_ARMS
ARMS=${ARMS:-$DEFAULT_ARMS}
while read -r name arm size epochs seed; do
    [ -z "$name" ] && continue
    weights=()
    [ -n "$WEIGHTS" ] && weights=(--set "model.pretrained=$WEIGHTS/${arm%+ema}.pth")
    OMP_NUM_THREADS=2 python3 "$HERE/offline_pretrained.py" --datasets "$DATASET" --arms "$arm" \
        --seeds "$seed" --time-limit 0 --data-root "$DATA_ROOT" --out "$OUT/$name" \
        --set data.image_size="$size" --set train.epochs="$epochs" "${weights[@]}" \
        >"$OUT/$name.log" 2>&1 &
done <<<"$ARMS"
wait
for log in "$OUT"/*.log; do
    echo "== $(basename "$log" .log)"
    grep -A3 "^| arm" "$log" || tail -3 "$log"
done
