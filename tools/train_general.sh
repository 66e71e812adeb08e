#!/usr/bin/env bash
# Trains the general model (weights/deepspot_general.safetensors) with the package's own C trainer:
# fine-tuning the published weights on the realistic recipe (structured and real backgrounds, their
# real sources' left halves) mixed with the paper's recipes, validated on images made from other
# seeds and from the real sources' top-right quarters (the bottom-right quarters are the test set's).
#
#   tools/train_general.sh RUN_DIR [REALDATA_DIR [START_WEIGHTS]]   # first time: makes the data, starts
#   tools/train_general.sh RUN_DIR [REALDATA_DIR [START_WEIGHTS]]   # again: continues the run (--resume)
#
# REALDATA_DIR defaults to $DEEPSPOT_REALDATA, then ../shared/realdata; START_WEIGHTS (the weights the
# fine-tuning starts from) to the published ones, "hybrid". Runs for hours on a 2-core CPU;
# run it in the background (nohup ... &); each epoch is a checkpoint.
set -euo pipefail
run=${1:?usage: tools/train_general.sh RUN_DIR [REALDATA_DIR]}
realdata=${2:-${DEEPSPOT_REALDATA:-../shared/realdata}}
start_weights=${3:-hybrid}
# the real images whose quarters the benchmark tests on (realistic_eval.REAL_BACKGROUND_FILES)
mapfile -t sources < <(python3 -c "from deepspot_napari.realistic_eval import REAL_BACKGROUND_FILES as f; print(*f, sep='\n')")
paths=()
for s in "${sources[@]}"; do
  [[ -f "$realdata/$s" ]] || { echo "missing real background source $realdata/$s" >&2; exit 2; }
  paths+=("$realdata/$s")
done
ds="python3 -m deepspot_napari.cli"
data=$run/data
if [[ ! -f $data/done ]]; then
  mkdir -p "$data"
  $ds simulate "$data/train_realistic" -n 6000 --size 128 --seed 1100 --recipe realistic \
      --background "${paths[@]}" --background-part train
  for recipe in hybrid ds_var code; do
    $ds simulate "$data/train_$recipe" -n 600 --size 128 --seed 1200 --recipe "$recipe"
  done
  $ds simulate "$data/val_realistic" -n 400 --size 128 --seed 1300 --recipe realistic \
      --background "${paths[@]}" --background-part validation
  $ds simulate "$data/val_hybrid" -n 100 --size 128 --seed 1400 --recipe hybrid
  touch "$data/done"
fi
resume=()
[[ -f $run/train/state.json ]] && resume=(--resume)
exec $ds train "$data/train_realistic" "$data/train_hybrid" "$data/train_ds_var" "$data/train_code" \
    --validation "$data/val_realistic" "$data/val_hybrid" \
    -o "$run/train" "${resume[@]}" --weights "$start_weights" --epochs 60 --patience 12 --patch-size 128 --batch-size 8 \
    --learning-rate 1e-4 --target-background 0.5 --seed 0 --no-annotation-check -q
