#!/usr/bin/env bash
# The checks only a CUDA GPU can make, in one call, each step under its own time limit and all of them under a
# global deadline (scripts/gpu_lib.sh: a hung step cannot eat the others' time). Run from the repository root:
#
#   OUT=out/gpu bash scripts/gpu_check.sh          # DEADLINE_S=420 by default
#
# The project's packages must be importable: `make venv` on a GPU machine, or the wheels of ../shared/gpu in .whl/
# (gpu_setup installs them into /tmp/site when deepspeed, datasets or pydantic is missing). On the lent machine,
# from a checkout that holds .whl/ and the data dirs below (all of it about 60 MB; the limit is 64 MiB):
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", "data/default", "data/bench-base-gpu",
#       "data/bench-base-gpu-nopack"], timeout_s=480)
#
# Steps, in priority order (what is left when the deadline comes is skipped; a failing step does not stop the next;
# ONLY="kernels cuda" runs only those, e.g. a rerun after a fix while the machine is still warm):
#   kernels   the Triton kernels' tests, compiled on the GPU (fp32/fp16/bf16; pytest-xdist where installed)
#   cuda      tests/integration/test_cuda.py: the model with every kernel vs PyTorch, bf16/fp16 training through DeepSpeed,
#             resume in-process, NCCL collectives in the group a run makes (one rank: NCCL refuses two ranks on
#             one GPU)
#   kbench    python -m kernels.bench --quick: each kernel vs PyTorch eager / SDPA, bf16, %peak of a measured matmul
#   tp_base   BERT-base (configs/bench/bert-base/baseline.yaml, seq 128, micro batch 128, bf16, LAMB) side by side:
#             ours with SDPA, ours with every Triton kernel, ours compiled, Hugging Face
#   tp_pad    the unpadded path on a padded batch (prepare --no-pack, ~63% [PAD]) at BERT-base shape: ours unpadded
#             (SDPA per length bucket), ours padded, ours with the kernels (varlen attention), Hugging Face
#   ckpt      `python -m training.pretrain` on CUDA through the command line: checkpoint, --resume repeats the
#             uncut run's losses, `training.evaluate` scores it on the GPU
#   lamb      DeepSpeed's FusedLamb (JIT-built with the machine's nvcc) against the rule training/engine/lamb.py
#             documents
#   tp_small  ours (eager, compiled) vs Hugging Face at the small shape (configs/baseline.yaml, data/default)
# Writes OUT/summary.txt (one line per step: rc, seconds), OUT/results.tar.gz (every log and JSON) and, beside it,
# kernels_bench.json, tp_base.json, tp_pad.json and tp_small.json.
#
# Data it reads (prepare them on the CPU, once; data/ is git-ignored):
#   python -m training.data build-default --out data/default                                        (4.3 MB)
#   python -m training.data prepare --input ../shared/corpus/debian-docs.txt.xz --out data/bench-base-gpu \
#       --seq-len 128 --tokenizer train:30522 --heldout-fraction 0.01           (34.8 MB: the whole corpus, 15.8 M
#                                                                               training tokens, int16 ids, 300 s)
#   python -m training.data prepare --input ../shared/corpus/debian-docs.txt.xz --out data/bench-base-gpu-nopack \
#       --seq-len 128 --tokenizer data/bench-base-gpu/tokenizer --no-pack --heldout-fraction 0.03 --max-docs 4000
#                                                                               (2.1 MB; 62.7% of positions [PAD])
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
BASE_DATA=${BASE_DATA:-data/bench-base-gpu}
PAD_DATA=${PAD_DATA:-data/bench-base-gpu-nopack}
gpu_setup || { finish; exit 1; }

XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # Triton compiles on the CPU: 8 processes share the GPU
PYTEST=($PY -m pytest -q -p no:cacheprovider -rs)
step kernels 120 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} --maxfail=10 tests/unit/test_kernels_attention.py \
  tests/unit/test_kernels_fused.py
step cuda 120 "${PYTEST[@]}" --maxfail=10 tests/integration/test_cuda.py -k "not fused_lamb and not pretrain_command"
step kbench 45 $PY -m kernels.bench --quick --out "$WORK/kernels_bench.json"
TP=($PY -m training.bench throughput --steps 10 --warmup 3 --repeats 3)
BASE=(--config configs/bench/bert-base/baseline.yaml --set data.dir=$BASE_DATA train.micro_batch_size=128
      train.grad_accum=1)
step tp_base 120 "${TP[@]}" "${BASE[@]}" --models ours ours_fused ours_compiled hf --out "$WORK/tp_base"
step tp_pad 60 "${TP[@]}" "${BASE[@]}" --set data.dir=$PAD_DATA --models ours ours_padded ours_fused hf \
  --out "$WORK/tp_pad"
step ckpt 90 "${PYTEST[@]}" tests/integration/test_cuda.py -k pretrain_command
step lamb 90 "${PYTEST[@]}" tests/integration/test_cuda.py -k fused_lamb
step tp_small 60 "${TP[@]}" --config configs/baseline.yaml --models ours ours_compiled hf --out "$WORK/tp_small"

for name in tp_base tp_pad tp_small; do
  [ -f "$WORK/$name/throughput.json" ] && cp "$WORK/$name/throughput.json" "$WORK/$name.json"
done
finish kernels_bench.json tp_base.json tp_pad.json tp_small.json
