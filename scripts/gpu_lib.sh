# Sourced (not run) by scripts/gpu_check.sh and scripts/gpu_ttq.sh: what a one-call GPU check needs.
#
#   OUT         where results go (default out/gpu); DEADLINE_S the global deadline in seconds from sourcing
#   PY          the Python to use (default python3)
#
# - gpu_setup: when .whl/ holds the wheels of ../shared/gpu/README.md and deepspeed, datasets or pydantic is not
#   importable, installs them into /tmp/site (PYTHONPATH, which the tests' subprocesses inherit), then writes the
#   versions and the GPU to $WORK/logs/env.log and prints them.
# - step NAME LIMIT_S CMD...: runs CMD under its own limit and the global deadline (a hung step cannot eat the
#   others' time; one with under 20 s left is skipped), its output in $WORK/logs/NAME.log, one line
#   `NAME rc=.. Ns (limit Ms)` in $OUT/summary.txt, the log's tail on stdout. A failing step does not stop the next.
#   At its limit CMD gets SIGTERM, then SIGKILL STEP_KILL_AFTER seconds later (default 5; a training run that
#   checkpoints on SIGTERM wants longer). STEP_RC and STEP_S hold the step's exit code (-1: skipped) and seconds.
#   ONLY="name name ...": run only those steps (a rerun of what failed, on a machine still warm).
# - finish [FILE...]: what comes back from a device call is at most 8 files, 2 folders deep: packs $WORK (logs and
#   every step's output) into $OUT/results.tar.gz, copies the FILEs (paths under $WORK) to $OUT, prints the summary.
set -u
OUT=${OUT:-out/gpu}
DEADLINE_S=${DEADLINE_S:-420}
PY=${PY:-python3}
WORK=$OUT/work
START=$(date +%s)
mkdir -p "$WORK/logs"
: > "$OUT/summary.txt"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

gpu_setup() {
  if [ -d .whl ] && ! $PY -c "import deepspeed, datasets, pydantic" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      || { echo "setup: installing .whl/ failed" | tee -a "$OUT/summary.txt"; return 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
    $PY - <<'EOF'
import numpy, pyarrow, torch, triton, transformers, datasets, deepspeed
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, NCCL {nccl}) triton {triton.__version__} "
      f"transformers {transformers.__version__} deepspeed {deepspeed.__version__} datasets {datasets.__version__} "
      f"pyarrow {pyarrow.__version__} numpy {numpy.__version__}; {gpu}")
EOF
  } > "$WORK/logs/env.log" 2>&1
  local rc=$?
  cat "$WORK/logs/env.log"
  (( rc == 0 )) || echo "setup: an import failed (env.log); datasets 5.2 needs pyarrow >= 24: ../shared/gpu/README.md" \
    "has its wheel (wheels-pyarrow/, 49 MB: leave the transformers wheel and the large data dir behind)" \
    | tee -a "$OUT/summary.txt"
  return $rc
}

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  STEP_RC=-1 STEP_S=0
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  if (( left < 20 )); then echo "$name skipped (deadline)" | tee -a "$OUT/summary.txt"; return 0; fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  local t0=$(date +%s)
  timeout -k "${STEP_KILL_AFTER:-5}" "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  STEP_RC=$? STEP_S=$(( $(date +%s) - t0 ))
  printf '%-9s rc=%-3s %4ss (limit %ss)\n' "$name" "$STEP_RC" "$STEP_S" "$limit" | tee -a "$OUT/summary.txt"
  tail -n 12 "$WORK/logs/$name.log"
  return 0
}

finish() {  # finish [FILE under $WORK ...]
  local f
  for f in "$@"; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
  echo "total $(( $(date +%s) - START )) s" >> "$OUT/summary.txt"
  tar -czf "$OUT/results.tar.gz" -C "$WORK" . && rm -rf "${WORK:?}"
  cat "$OUT/summary.txt"
}
