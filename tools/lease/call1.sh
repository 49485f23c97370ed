#!/usr/bin/env bash
# Call 1, two H200s (about 9 min): correctness on NCCL with buffers far smaller than the messages.
#   1. every schedule family that the exactness runs do not cover trains 3 steps (gpipe, seq1f1b k=4, interleaved v=2)
#   2. exactness: pp=2 1f1b, pp=2 seq1f1b, sp=2, dp=2 match one GPU over 5 steps; swap / skip_rs variants must not
#   3. tools/nccl_replay.py: built, unmirrored and ungrouped programs of every family; model verdict vs hardware
CALL=call1
cd "$(dirname "$0")/../.." || exit 1  # the project root
source tools/lease/common.sh
export NCCL_BUFFSIZE=262144
PT="python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py"
step families 105 $PT -k "family and (gpipe or k4 or interleaved)" --basetemp="$RES/families" --junitxml="$RES/families.xml"
step exactness 285 $PT -k "test_layouts_match_one_gpu" --basetemp="$RES/exact" --junitxml="$RES/exactness.xml"
step replay 160 python3 tools/nccl_replay.py --pp 2 --forms built,unmirrored,ungrouped --timeout 18 --json "$RES/replay.json"
pack
