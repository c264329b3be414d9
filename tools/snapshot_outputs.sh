#!/usr/bin/env bash
# Run the five commands on the bundled defaults and with extended options, writing every
# output under DIR: `tools/snapshot_outputs.sh DIR`. Two snapshots are compared with
# `python tools/compare_outputs.py A B` (bytes; summary.json less its timing keys): the check
# that a refactor changed no output.
set -euo pipefail
OUT=${1:?usage: tools/snapshot_outputs.sh DIR}
DCN=${DCN:-.venv/bin/dcn-inspect}
# svg and pdf embed their creation date unless this is set (matplotlib honours it).
export SOURCE_DATE_EPOCH=0
IMG=dcn_inspect/data/images
DEMO=dcn_inspect/data/demo/annotations.json
rm -rf "$OUT"; mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $*" >&2; $DCN "$@" --out "$OUT/$name" > "$OUT/$name.stdout" 2>&1 || echo "exit $?" >> "$OUT/$name.stdout"; }
run sp-default sample-points
run sp-extended sample-points $IMG/scene_00.jpg --at 40,40 --at 100,60 --grid 4 --levels 2 --group mean --round --gif --grad-weight --color-by-level --zoom --save-offsets "$OUT/sp-offsets.npz"
run sp-boxes sample-points $IMG/photo_chelsea.jpg --boxes $IMG/annotations.json --thresholds coco --format svg
run ds-default dilation-stats
run ds-extended dilation-stats $DEMO --per-group --per-unit --units pixels --thresholds coco --max-images 5 --batch-size 2
run bins-default bins
run bins-dataset bins $DEMO --max-images 4
run bins-extended bins $IMG/scene_09.jpg --roi 10,10,90,80 --points --overlay --class auto
run off-default offsets
run off-extended offsets $IMG/scene_04.jpg --kernel-point 1,1 --group 0 --format pdf
run rf-default receptive-field $IMG/scene_04.jpg --at 8,8 --at 64,232 --at 128,136 --compare-model dcn-sample-dilated
run rf-stats receptive-field $DEMO --stats --max-images 2
$DCN info > "$OUT/info.stdout" 2>&1 || true
$DCN info --model dcn-sample $IMG/scene_00.jpg > "$OUT/info-image.stdout" 2>&1 || true
$DCN models > "$OUT/models.stdout" 2>&1 || true
