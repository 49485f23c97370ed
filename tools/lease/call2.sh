#!/usr/bin/env bash
# Call 2, two H200s (about 8 min): measurements beside their baselines, the planner's prediction beside each.
#   1. tools/link_bench.py: p2p and all-to-all times, fitted into the profile (tools/fit_links.py, on this machine's CPU)
#   2. Seq1F1B k=4 vs 1F1B, pp=2, Llama-3.2-1B, 32k and 64k tokens x 4 micro-batches (tokens/s, stage-0 peak)
#   3. Ulysses sp=2 vs one GPU at 128k (scaling efficiency)
CALL=call2
cd "$(dirname "$0")/../.." || exit 1  # the project root
source tools/lease/common.sh
step links 50 python3 tools/link_bench.py --gpus 2 --json "$RES/links.json"
step fit 20 python3 tools/fit_links.py "$RES/links.json" --profile h200 --out "$RES/h200_fitted.json"
step pipeline 290 python3 tools/multi_gpu.py --out "$RES/pipeline" --only pipeline32k pipeline64k --steps 4 --timeout 140
step ulysses 190 python3 tools/multi_gpu.py --out "$RES/ulysses" --only ulysses --steps 3 --timeout 150
pack
