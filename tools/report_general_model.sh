#!/usr/bin/env bash
# Every figure of the general model's card (weights/README.md) and of docs/accuracy.md's "general model"
# section, made by the documented commands, into docs/accuracy/general/:
#   realistic/   deepspot evaluate --realistic (SNR bins, densities, empty images; Big-FISH, U-FISH, published)
#   paper/       deepspot evaluate --simulated + the authors' 50 images (no regression)
#   real/        the expert-annotated real image, whole (published and general)
#   ../real_unannotated_models.png, ../real_unannotated_counts.md
#
#   tools/report_general_model.sh WEIGHTS          (REALDATA from $DEEPSPOT_REALDATA, else ../shared/realdata)
set -euo pipefail
cd "$(dirname "$0")/.."
weights=${1:?usage: tools/report_general_model.sh WEIGHTS (a file, or a bundled model name once shipped)}
realdata=${DEEPSPOT_REALDATA:-../shared/realdata}
out=docs/accuracy/general
ds="python3 -m deepspot_napari.cli"
mkdir -p "$out"
$ds evaluate --realistic --weights "$weights" --compare hybrid --realdata "$realdata" -o "$out/realistic" --overwrite -q
$ds evaluate --simulated --weights "$weights" --no-raw -q --overwrite -o "$out/paper" \
    "authors_sim=$realdata/deepspot_authors_sim/original,$realdata/deepspot_authors_sim/csv"
for w in "$weights" hybrid; do
  $ds evaluate --weights "$w" --no-raw -q --overwrite -o "$out/real_$(basename "${w%.safetensors}")" \
      "insta_293T=$realdata/annotated/insta_smfish_293t_tfrc/image.tif,$realdata/annotated/insta_smfish_293t_tfrc/spots.csv"
done
python3 tools/real_unannotated_overlays.py --weights "$weights" --compare hybrid --realdata "$realdata"
