#!/usr/bin/env bash
# The deep bench (BENCHMARKS.md section 2, "Six layers"), as it was run: two lanes side by side, one thread
# each, on a 2-core machine. Each lane is one `compare` process that trains its runs one after another; a run's
# eval records, resolved config, BLiMP points and exit record land in docs/bench/deep*/ (everything else there
# is git-ignored), so a later sitting, on any machine, picks up what is missing with --only and redraws the
# report with --report-only.
#
#   bash scripts/bench_deep.sh baseline      # first, alone or beside the anneal lane: the target of the others
#   bash scripts/bench_deep.sh lane-a & bash scripts/bench_deep.sh lane-b & wait
#   bash scripts/bench_deep.sh report        # every table and plot again, from the records
#
# Data: data/deep-debian (the configs' header says how to prepare it); BLIMP: the 67 BLiMP paradigms
# (../shared/blimp on the project's machines; hf:nyu-mll/blimp from a datasets cache also works).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
BLIMP=${BLIMP:-../shared/blimp}
ROOT=${ROOT:-docs/bench}  # where the records go (another checkout's docs/bench when the code runs from a worktree)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
D=configs/bench/deep
ALL=(baseline baseline_seed2 baseline_budget stacking mslt compound layerdrop core earlybert stacking_layerdrop)
CONFIGS=()
for n in "${ALL[@]}"; do CONFIGS+=("$D/$n.yaml"); done
# BLiMP (50 pairs of each paradigm) at each run's target crossing and at its end; the baseline, run first, also
# every 500 steps (its BLiMP curve). A PLL costs a forward pass per word piece: about 3-4 minutes of one core per
# checkpoint of this model.
compare() {  # compare BLIMP_EVERY ARGS...: the main comparison (every config of the folder), ARGS added
  $PY -m training.bench compare --out "$ROOT/deep" --pause-at-target --control baseline_budget --blimp "$BLIMP" \
    --blimp-per-paradigm 50 --blimp-every "$1" --no-progress --configs "${CONFIGS[@]}" "${@:2}"
}
# The anneal at half and at 1.5x its length (800 -> 400, 1200 steps), baseline and stacking: does the ranking hold?
anneal() {
  $PY -m training.bench compare --out "$ROOT/deep-anneal$1" --stop-at-target --no-progress \
    --set "train.locality_bias.steps=$1" --configs "$D/baseline.yaml" "$D/stacking.yaml" "${@:2}"
}
case "${1:-}" in
  baseline) compare 500 --only baseline ;;
  lane-a) compare 0 --only baseline_seed2 stacking mslt compound layerdrop ;;
  lane-b) anneal 400 && anneal 1200 &&
          compare 0 --only baseline_budget core earlybert stacking_layerdrop ;;
  anneal) anneal "${2:?anneal STEPS}" "${@:3}" ;;
  report) compare 0 --report-only
          for a in 400 1200; do anneal "$a" --report-only; done ;;
  *) echo "usage: $0 baseline|lane-a|lane-b|anneal STEPS|report" >&2; exit 2 ;;
esac
