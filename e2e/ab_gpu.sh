#!/usr/bin/env bash
# A/B of two code trees on a GPU in one device call, as docs/benchmarks.md's "Fewer kernels per layer" ran it.
#   here:       e2e/ab_gpu.sh prepare BASE_REF NEW_REF   (git archives both into the git-ignored .ab/)
#   the device: bash e2e/ab_gpu.sh run [quick|async|short|kernels]   (through the device tool, carry [".whl", ".ab"])
# `quick` skips 128K, the profile and Llama-8B, and times issue 7's budget-256 rows of the new tree instead.
# `short` checks the kernels alone (tests/fused_check.py) and times both trees at 4K, 32K and 128K.
# `async` times the new tree alone, with --async-scheduling off and auto (rows labelled new:off, new:auto).
# `kernels` sweeps the new tree's launch settings (e2e/micro_kernels.py, SmolLM2 and Llama-8B) and runs
# e2e/micro_top.py in both trees (the base tree's own e2e/ when it has one), then times both at 32K.
# The run checks the new tree's kernels (e2e/gpu_checks.py), then times both trees in the same call, rows
# labelled by "tree" (e2e/plot_ab.py draws them), at most eight files under $OUT.
set -u
AB=$PWD/.ab
if [ "${1:-}" = prepare ]; then
  rm -rf "$AB" && mkdir -p "$AB/base" "$AB/new"
  grep -qx '/.ab/' .git/info/exclude 2>/dev/null || echo '/.ab/' >> .git/info/exclude
  git archive "$2" server e2e | tar -x -C "$AB/base"
  git archive "$3" server tests/fused_check.py tests/fused_writes.py tests/fused_select.py e2e | tar -x -C "$AB/new"
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/run.log
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/run.log
if [ "${2:-}" = short ]; then  # the Triton kernels against their eager code only, in bfloat16 and float32
  (cd $AB/new && PYTHONPATH=/tmp/site:$AB/new/server:$AB/new timeout 120 python3 -c "import torch
from tests.fused_check import check_all
check_all('cuda', torch.bfloat16); check_all('cuda'); print('every kernel equals its eager code')") > $OUT/checks.log 2>&1
else
  (cd $AB/new && PYTHONPATH=/tmp/site:$AB/new/server:$AB/new timeout 240 python3 e2e/gpu_checks.py) > $OUT/checks.log 2>&1
fi
echo "gpu_checks rc $?" | tee -a $OUT/checks.log $OUT/run.log
ARGS="bench decode --device cuda --dtype bfloat16 --budget 2048 --tokens 16 --select-every 4 --reserve-dtype int8 --json --policies slam"
bench() { local tree=${1%%:*} label=$1 out=$2 t=$3; shift 3; local s=$SECONDS  # label: tree or tree:variant
  (cd $AB/$tree && PYTHONPATH=/tmp/site:$AB/$tree/server timeout $t python3 -m slam.cli $ARGS "$@" 2>>$OUT/err.log) | sed "s/^{/{\"tree\": \"$label\", /" >> $OUT/$out.jsonl
  echo "$label $* rc ${PIPESTATUS[0]} $((SECONDS - s)) s" | tee -a $OUT/run.log; }
S="--shape smollm2-135m --batches 32"
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=16; [ "$MEM" -gt 120000 ] && B=32  # Llama-8B at batch 32 and 32K needs an H200's memory
micro() { (cd $AB/new && PYTHONPATH=/tmp/site:$AB/new/server:$AB/new timeout 60 python3 e2e/micro_top.py) > $OUT/micro.txt 2>&1; }
finish() { tail -c 3000 $OUT/err.log > $OUT/err.tail; rm -f $OUT/err.log; exit 0; }
if [ "${2:-}" = async ]; then  # one tree, steps in order against steps launched ahead (async scheduling)
  for mode in off auto; do bench new:$mode smollm 120 $S --contexts 4000,32000 --async-scheduling $mode; done
  bench new:auto smollm 150 $S --contexts 4000,32000 --policies streaming --baseline transformers
  bench new:auto smollm 90 $S --contexts 131072 --policies streaming,slam
  for mode in off auto; do
    bench new:$mode budget256 200 --shape smollm2-135m --batches 1,32 --contexts 4000 --budget 256 --tokens 32 \
      --select-every 1 --reserve-dtype auto --policies full,streaming,slam --async-scheduling $mode \
      $([ $mode = auto ] && echo --baseline transformers)
  done
  for mode in off auto; do bench new:$mode llama 150 --shape llama-8b --batches $B --contexts 32000 --async-scheduling $mode; done
  finish
fi
if [ "${2:-}" = kernels ]; then  # the kernels alone, then both trees at 32K
  for shape in "smollm2-135m --batch 32" "llama-8b --batch $B"; do
    (cd $AB/new/e2e && PYTHONPATH=/tmp/site:$AB/new/server:$AB/new timeout 150 python3 micro_kernels.py --shape $shape \
      --context 32000) >> $OUT/micro-kernels.txt 2>&1
  done
  for tree in base new; do
    dir=$AB/$tree/e2e; [ -f $dir/micro_top.py ] || dir=$AB/new/e2e
    (cd $dir && PYTHONPATH=/tmp/site:$AB/$tree/server timeout 60 python3 micro_top.py) > $OUT/micro-top-$tree.txt 2>&1
  done
  for tree in base new; do bench $tree smollm 60 $S --contexts 32000; done
  finish
fi
if [ "${2:-}" = short ]; then  # little device time left: both trees at three contexts
  for tree in base new; do bench $tree smollm 90 $S --contexts 4000,32000,131072; done
  finish
fi
bench base smollm 90 $S --contexts 4000,32000
bench new smollm 150 $S --contexts 4000,32000 --policies streaming,slam --baseline transformers
if [ "${2:-}" = quick ]; then
  bench new budget256 200 --shape smollm2-135m --batches 1,32 --contexts 4000 --budget 256 --tokens 32 --select-every 1 \
    --reserve-dtype auto --policies full,streaming,slam --baseline transformers
  micro
  finish
fi
bench new smollm 90 $S --contexts 131072
bench base smollm 90 $S --contexts 131072
micro
(cd $AB/new && PYTHONPATH=/tmp/site:$AB/new/server:$AB/new timeout 90 python3 e2e/profile_step.py --batch 32 --budget 2048 \
  --oversample 2 --every 4 --reserve-dtype int8 --policies slam --context 32000 --rows 45) > $OUT/profile.txt 2>&1
bench new llama 150 --shape llama-8b --batches $B --contexts 32000
bench base llama 150 --shape llama-8b --batches $B --contexts 32000
finish
