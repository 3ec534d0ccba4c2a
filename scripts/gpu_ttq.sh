#!/usr/bin/env bash
# BERT-base time to quality on one GPU, in one call: configs/bench/bert-base/baseline.yaml against stacking.yaml
# (progressive stacking 3 -> 6 -> 12 layers), each cut to the same wall budget, then BLiMP of both final models on
# the GPU and the compare report (tokens and FLOPs to the baseline's final fixed-mask loss, tokens/s and MFU per
# stage, loss against FLOPs). Each step has its own time limit, all under a global deadline (scripts/gpu_lib.sh).
#
#   OUT=out/ttq bash scripts/gpu_ttq.sh
#
# On the lent machine, from a checkout that holds .whl/ (../shared/gpu/README.md), the data dir below and BLiMP
# copied into .blimp/ (git-ignored: cp -r ../shared/blimp .blimp): about 59 MB in all.
#
#   run(command="bash scripts/gpu_ttq.sh", carry=[".whl", "data/bench-base-gpu", ".blimp"], timeout_s=600)
#
# Both runs get the same (env vars, defaults for an H100):
#   WALL_S=200       training-loop seconds (run.max_wall_s: a run still going then is evaluated, checkpointed and
#                    stopped; its LR schedule is not shortened)
#   STEPS=2400       the LR schedule's length (--max-steps: stacking's stages and warmups scaled in proportion).
#                    Where it comes from: this H100 kind ran a bf16 8192^3 matmul at 798 TFLOP/s
#                    (/work/.library/device/KINDS.md, 2026-11-13); BERT-base at seq 128 costs 0.545 GFLOP per
#                    trained token (training/model/flops.py); at an assumed 30% MFU (not measured: no GPU has run
#                    this yet) that is 439k tokens/s, 13.4 steps/s of 256 x 128 tokens, 2,680 steps in 200 s; 2,400
#                    leaves room for the evaluations and the slower steps while the locality aid is on.
#   EVAL_EVERY=400   held-out fixed-mask evaluation (1,280 rows) every ~30 s at that rate, plus one at each stage end
#   the global batch of the configs (micro batch 128 x accumulation 2 = 256 x 128 tokens), and the locality aid
#   (train.locality_bias) over the first quarter of the schedule (STEPS/4 global steps, across stage boundaries).
# Then BLIMP_N=100 pairs of each of BLiMP's 67 paradigms per model (training.evaluate --blimp, on the GPU).
# The time: ~15 s set-up + 2 x (WALL_S + ~35 s start-up, final evaluation and checkpoint) + ~60 s BLiMP and reports
# = ~545 s of the DEADLINE_S=580; a step the deadline leaves no time for is skipped (BLiMP of stacking first).
#
# Writes to OUT: summary.txt (each step's rc and seconds, then the report), report.md (the compare report),
# loss_vs_flops.png, loss_vs_time.png, and results.tar.gz (both runs' metrics.jsonl and config.resolved.json,
# report.json, blimp_*.json, every log). The runs themselves (checkpoints: ~1.3 GB each) stay in TTQ_RUNS
# (default out/ttq-runs), where a second call on the same machine finds them: TTQ_SKIP_TRAIN=1 redoes only BLiMP
# and the report; ONLY="stacking same report ..." runs only the steps named (scripts/gpu_lib.sh).
#
# Data (prepared on the CPU once, 300 s on 2 cores; data/ is git-ignored): the whole Debian corpus, 15.8 M training
# tokens, WordPiece vocabulary 30,522, 1% of the documents held out (1,299 rows), int16 ids, 34.8 MB:
#   python -m training.data prepare --input ../shared/corpus/debian-docs.txt.xz --out data/bench-base-gpu \
#       --seq-len 128 --tokenizer train:30522 --heldout-fraction 0.01
#
# On the CPU, the whole script at a tiny shape (tests/integration/test_gpu_scripts.py runs it so):
#   TTQ_TINY=1 TTQ_DATA=data/default OUT=/tmp/ttq TTQ_RUNS=/tmp/ttq-runs bash scripts/gpu_ttq.sh
# swaps in a hidden-64 model, fp32, micro batch 8, a 40-step schedule, a 3 s budget and 2 BLiMP pairs per paradigm
# of tests/data/blimp.
set -u
cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-580}
source scripts/gpu_lib.sh

BASE_CFG=configs/bench/bert-base/baseline.yaml
STACK_CFG=configs/bench/bert-base/stacking.yaml
RUNS=${TTQ_RUNS:-out/ttq-runs}
if [ "${TTQ_TINY:-0}" = 1 ]; then
  DATA=${TTQ_DATA:?TTQ_TINY=1 needs TTQ_DATA, a prepared data dir}
  : "${WALL_S:=3}" "${STEPS:=40}" "${EVAL_EVERY:=8}" "${BLIMP:=tests/data/blimp}" "${BLIMP_N:=2}"
  LOG_EVERY=2 TRAIN_LIMIT=$(( WALL_S + 120 ))
  SHAPE=(model.hidden_size=64 model.num_heads=2 model.ffn_size=128 train.precision=fp32
         train.micro_batch_size=8 train.grad_accum=1 run.eval_batches=2 run.eval_batch_size=8)
else
  DATA=${TTQ_DATA:-data/bench-base-gpu}
  : "${WALL_S:=200}" "${STEPS:=2400}" "${EVAL_EVERY:=400}" "${BLIMP:=.blimp}" "${BLIMP_N:=100}"
  LOG_EVERY=50 TRAIN_LIMIT=$(( WALL_S + 75 ))
  SHAPE=()
fi
[ -d "$BLIMP" ] || BLIMP=../shared/blimp
VOCAB=$($PY -c "import json, sys; print(json.load(open(sys.argv[1] + '/stats.json'))['vocab_size'])" "$DATA") \
  || { echo "no prepared data in $DATA" | tee -a "$OUT/summary.txt"; finish; exit 1; }
gpu_setup || { finish; exit 1; }

# The locality aid over the first quarter of the schedule: --max-steps scales a staged config's
# train.locality_bias.steps with its stages (training/config/length.py), so stacking's is given at its own planned
# length (60,000 steps) and comes out at the baseline's; the `same` step checks that both resolved to the same.
AID=$(( STEPS / 4 ))
STACK_PLANNED=$($PY -c "import sys, yaml; print(sum(s['steps'] for s in yaml.safe_load(open(sys.argv[1]))['stages']))" \
  "$STACK_CFG")
COMMON=(--max-steps "$STEPS" --overwrite --set data.dir="$DATA" model.vocab_size="$VOCAB" run.max_wall_s="$WALL_S"
        run.eval_every="$EVAL_EVERY" run.log_every="$LOG_EVERY" run.save_every=0 run.keep_last=1 run.progress=false
        run.export_hf=false "run.report_to=[]" ${SHAPE[@]+"${SHAPE[@]}"})

train() {  # train NAME CONFIG AID_STEPS: one pretrain run, and the record compare --report-only reads
  local name=$1 config=$2 aid=$3
  mkdir -p "$RUNS/logs"
  local cmd=($PY -m training.pretrain --config "$config" --out "$RUNS/runs/$name" "${COMMON[@]}"
             --set train.locality_bias.steps="$aid")
  STEP_KILL_AFTER=60 step "$name" "$TRAIN_LIMIT" "${cmd[@]}"
  [ "$STEP_RC" = -1 ] && return 0  # not run: the run dir keeps what an earlier call left
  cp "$WORK/logs/$name.log" "$RUNS/logs/$name.log"
  printf '{"command": "%s", "exit_code": %s, "stopped_at_step": null, "process_s": %s}\n' "${cmd[*]}" "$STEP_RC" \
    "$STEP_S" > "$RUNS/logs/$name.json"
}

report() {  # report NAME [--note TEXT ...]: the compare report, rebuilt from the run dirs
  local name=$1; shift
  step "$name" 60 $PY -m training.bench compare --configs "$BASE_CFG" "$STACK_CFG" --names baseline stacking \
    --out "$RUNS" --report-only --no-progress "$@" \
    --note "both runs: ${WALL_S} s of training at most (run.max_wall_s), a ${STEPS}-step LR schedule, the locality"\
" aid over its first ${AID} steps, held-out evaluation every ${EVAL_EVERY} steps and at each stage end"
}

if [ "${TTQ_SKIP_TRAIN:-0}" != 1 ]; then
  train baseline "$BASE_CFG" "$AID"
  train stacking "$STACK_CFG" $(( AID * STACK_PLANNED / STEPS ))
fi
step same 30 $PY - "$RUNS/runs/baseline" "$RUNS/runs/stacking" <<'EOF'
import json, sys
keys = lambda c: {"global batch": c["train"]["micro_batch_size"] * c["train"]["grad_accum"],
                  "steps": sum(s["steps"] for s in c["stages"]) if c.get("stages") else c["train"]["max_steps"],
                  "locality_bias": c["train"]["locality_bias"], "eval_every": c["run"]["eval_every"],
                  "max_wall_s": c["run"]["max_wall_s"], "lr": c["optimizer"]["lr"]}
a, b = (keys(json.load(open(f"{d}/config.resolved.json"))) for d in sys.argv[1:])
print("baseline:", a, "\nstacking:", b)
sys.exit(0 if a == b else f"the two runs differ in what they should share: {a} vs {b}")
EOF
report report
for name in baseline stacking; do
  step "blimp_$name" 90 $PY -m training.evaluate --model "$RUNS/runs/$name" --blimp "$BLIMP" --per-paradigm "$BLIMP_N" \
    --out "$WORK/blimp_$name.json" --overwrite
done
NOTES=()
for name in baseline stacking; do
  line=$(grep -h "BLiMP" "$WORK/logs/blimp_$name.log" 2>/dev/null | tail -n 1)
  line=${line%% -> *}
  [ -n "$line" ] && NOTES+=(--note "$name: BLiMP ${line#* BLiMP }")
done
[ ${#NOTES[@]} -gt 0 ] && report report_blimp "${NOTES[@]}"

for name in baseline stacking; do
  mkdir -p "$WORK/runs/$name"
  cp "$RUNS/runs/$name/metrics.jsonl" "$RUNS/runs/$name/config.resolved.json" "$WORK/runs/$name/" 2>/dev/null
done
cp "$RUNS"/report.json "$RUNS"/report.md "$RUNS"/loss_vs_flops.png "$RUNS"/loss_vs_time.png "$WORK/" 2>/dev/null
finish report.md loss_vs_flops.png loss_vs_time.png
[ -f "$OUT/report.md" ] && cat "$OUT/report.md"
