#!/usr/bin/env bash
# Call 4, four or eight H200s (about 9 min): the wide layouts match one GPU, then are measured the same way
# (pp=4 Seq1F1B vs 1F1B; sp=4, pp=2 x sp=2 and, on 8 GPUs, pp=2 x sp=2 x dp=2 against one GPU at 128k).
CALL=call4
cd "$(dirname "$0")/../.." || exit 1  # the project root
source tools/lease/common.sh
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
export NCCL_BUFFSIZE=262144
step wide_exactness 170 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py -k wide --basetemp="$RES/pt" --junitxml="$RES/wide.xml"
unset NCCL_BUFFSIZE
step wide_measure 360 python3 tools/multi_gpu.py --gpus "$N" --out "$RES/wide" --steps 3 --timeout 150
pack
