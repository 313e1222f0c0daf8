#!/usr/bin/env bash
# Regenerates the pictures of docs/evaluation.md with the tool itself, on the built-in demo (tiny backbone,
# synthetic data; a few minutes on a CPU):
#   docs/overlay.png  - one `aaclip predict` overlay
#   docs/compare.png  - `aaclip compare --plot` of a base, a cross and a feedback run
# Usage: docs/make_figures.sh [WORKDIR]   (run from the repository root)
set -euo pipefail
here=$(pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
uri="sqlite:///$work/mlflow.db"
aaclip() { python -c 'from aaclip_cli.main import main; main()' "$@"; }
common=(--tracking-uri "$uri" --set 'data.train.classes=["disc"]' --set 'data.test.classes=["disc"]'
        --set "data.train.root=\"$work/demo/train\"" --set "data.test.root=\"$work/demo/test\"")
fast=(--set eval.aupro=false --set eval.pixel_pairs=false)

base=$(aaclip train base --recipe demo "${common[@]}" --set stage1.epochs=2 --set stage2.epochs=4 -q | tail -n1)
cross=$(aaclip train cross --from "$base" --recipe cross-demo "${common[@]}" --set stage1.epochs=1 --set stage2.epochs=2 -q | tail -n1)
feedback=$(aaclip train feedback --from "$base" --recipe feedback-demo --loops 3 "${common[@]}" \
  --set feedback.text_epochs_per_loop=1 --set feedback.image_epochs_per_loop=2 -q | tail -n1)
aaclip test --run "$base" --tracking-uri "$uri" "${fast[@]}" -q >/dev/null
aaclip test --run "$cross" --tracking-uri "$uri" "${fast[@]}" -q >/dev/null
for loop in 1 3; do  # loop 2 is left untested on purpose: the plot must not draw a line through it
  aaclip test --run "$feedback" --loop "$loop" --tracking-uri "$uri" "${fast[@]}" -q >/dev/null
done
aaclip compare "$base" "$cross" "$feedback" --tracking-uri "$uri" --bootstrap 0 --plot "$here/docs/compare.png"

image=$(ls "$work"/demo/test/disc/test/crack/*.png | head -n1)
aaclip predict --run "$base" "$image" --out "$work/predict" --tracking-uri "$uri" -q >/dev/null || true
cp "$work/predict/overlays/$(basename "$image")" "$here/docs/overlay.png"
echo "written: docs/overlay.png docs/compare.png (work folder $work)"
