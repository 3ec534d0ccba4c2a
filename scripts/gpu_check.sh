#!/usr/bin/env bash
# The checks only a CUDA GPU can make, in one call, each step under its own time limit and all of them under
# a global deadline (a hung step cannot eat the others' time). Run from the repository root, with the
# project's packages importable (`make venv` on a GPU machine, or PYTHONPATH):
#
#   OUT=out/gpu bash scripts/gpu_check.sh
#
# Steps (a step that fails does not stop the next):
# Order is priority: what is left when the deadline comes is skipped.
#   tests      the compiled Triton kernels' tests and tests/test_cuda.py (model with every kernel vs PyTorch,
#              bf16/fp16 training through DeepSpeed, resume) on the GPU
#   lamb       DeepSpeed's fused LAMB (JIT-built) against the rule training/engine/lamb.py documents
#   kbench     python -m kernels.bench --quick (kernels vs PyTorch eager / SDPA)
#   tp_small   training throughput, ours (eager and model.compile) vs Hugging Face, configs/baseline.yaml
#   tp_base    the same at BERT-base shape (configs/bench/bert-base/baseline.yaml, micro batch 128)
#   tp_fused   ours at BERT-base shape with every Triton kernel on
# Writes OUT/summary.txt (one line per step: rc, seconds), OUT/logs.tar.gz and each step's JSON.
# Data it reads: data/default (`make data`) and BASE_DATA, a 30k-vocabulary dir, e.g.
#   python -m training.data prepare --input ../shared/corpus/debian-docs.txt.xz --out data/bench-base-gpu \
#       --seq-len 128 --tokenizer train:30522 --max-docs 30000      (27,431 tokens learned: BASE_VOCAB)
set -u
OUT=${OUT:-out/gpu}
DEADLINE_S=${DEADLINE_S:-420}
BASE_DATA=${BASE_DATA:-data/bench-base-gpu}
BASE_VOCAB=${BASE_VOCAB:-27431}
mkdir -p "$OUT" "$OUT/logs"
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
PY=${PY:-python3}
START=$(date +%s)

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if (( left < 20 )); then echo "$name skipped (deadline)" | tee -a "$OUT/summary.txt"; return; fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  printf '%-9s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/logs/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
} > "$OUT/logs/env.log" 2>&1
cat "$OUT/logs/env.log"

step tests 150 $PY -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_kernels_attention.py \
  tests/test_kernels_fused.py tests/test_cuda.py -k "not fused_lamb" -rs
step kbench 45 $PY -m kernels.bench --quick --out "$OUT/kernels_bench.json"
TP="$PY -m training.bench throughput --steps 10 --warmup 3 --repeats 3"
BASE="--config configs/bench/bert-base/baseline.yaml --set data.dir=$BASE_DATA --set model.vocab_size=$BASE_VOCAB
      --set train.micro_batch_size=128 --set train.grad_accum=1"
step tp_base 75 $TP $BASE --out "$OUT/tp_base"
step lamb 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k fused_lamb -rs
step tp_fused 50 $TP $BASE --models ours --set model.attention=fused \
  --set "model.fused_ops=[bias_gelu,residual_layernorm,mlm_loss]" --out "$OUT/tp_fused"
step tp_small 60 $TP --config configs/baseline.yaml --models ours ours_compiled hf --out "$OUT/tp_small"

for name in tp_small tp_base tp_fused; do
  [ -f "$OUT/$name/throughput.json" ] && cp "$OUT/$name/throughput.json" "$OUT/$name.json"
  rm -rf "${OUT:?}/$name"
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "${OUT:?}/logs"
echo "total $(( $(date +%s) - START )) s"
cat "$OUT/summary.txt"
