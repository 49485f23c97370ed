#!/usr/bin/env bash
# Call 3, two H200s (about 7 min): the distributed optimizer's overlap at dp=2 and sp=2, ring attention cp=2 when
# the schema has it, the launchers' start and stop, and the two families call 1 trains only in its exactness runs.
CALL=call3
cd "$(dirname "$0")/../.." || exit 1  # the project root
source tools/lease/common.sh
M="model=llama3_1b data.synthetic=true train.dtype=bf16 train.device=cuda logging.wandb.mode=disabled train.progress=false"
step overlap_dp2 100 python3 tools/overlap.py --out "$RES/ov_dp2" $M data.seq_len=16384 parallel=single parallel.dp=2 parallel.microbatches=2 parallel.bucket_mb=200
step overlap_sp2 100 python3 tools/overlap.py --out "$RES/ov_sp2" $M data.seq_len=32768 parallel=single parallel.sp=2 parallel.bucket_mb=200
step cp 200 python3 tools/multi_gpu.py --out "$RES/cp" --only cp --steps 3 --timeout 150
export NCCL_BUFFSIZE=262144
step start_stop_families 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py -k "starts_and_ends or (family and 1f1b and not k4)" --basetemp="$RES/pt"
pack
