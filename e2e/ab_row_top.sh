#!/usr/bin/env bash
# One-off, on the row-top branch: the row top-k on the GPU against its eager code, then budget 2048, batch 32,
# (b) the long-row top-k against (c) the one-program row top-k, and (a) the old oversampling with the long-row top-k.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/server:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 tests/fused_check.py cuda > $OUT/fused.log 2>&1; echo "fused_check rc $?" >> $OUT/fused.log
ARGS="bench decode --device cuda --dtype bfloat16 --budget 2048 --tokens 16 --select-every 4 --reserve-dtype int8 --json --policies slam --shape smollm2-135m --batches 32 --contexts 4000,32000"
LONG='import sys; import slam.cache.fused_top as f; f.ROW_LIMIT = 0; from slam.cli import main; sys.exit(main(sys.argv[1:]))'
timeout 200 python3 -m slam.cli $ARGS,128000 >> $OUT/c.jsonl 2>$OUT/c.err
timeout 120 python3 -c "$LONG" $ARGS >> $OUT/b.jsonl 2>$OUT/b.err
timeout 120 python3 -c "$LONG" $ARGS --select-oversample 16 >> $OUT/a.jsonl 2>$OUT/a.err
wc -l $OUT/*; tail -2 $OUT/fused.log
for f in $OUT/*.err; do tail -c 1500 $f > $f.t; mv $f.t $f; done
