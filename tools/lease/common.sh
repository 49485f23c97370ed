# Sourced by tools/lease/call*.sh: installs the carried wheels and sets the environment every run needs.
# Runs from the project root on the GPU machine; results go under $RES (in /tmp), packed into $OUT/<call>.tgz.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site WANDB_MODE=offline PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
RES=/tmp/lease/$CALL
mkdir -p "$RES"
T0=$(date +%s)
{ date -u; git log -1 --format='%h %s' 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m; python3 -c 'import torch, transformers; print("torch", torch.__version__, "nccl",
  torch.cuda.nccl.version(), "gpus", torch.cuda.device_count(), "transformers", transformers.__version__)'; } \
  > "$RES/machine.txt" 2>&1

step() {  # step NAME SECONDS CMD...: one run under its own timeout, its log in $RES/NAME.log, rc and time noted
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "== $name (limit ${limit}s, at +$((t - T0))s): $*"
  timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t ))s" | tee -a "$RES/steps.txt"
  tail -n 25 "$RES/$name.log"
}

pack() {  # everything under $RES but checkpoints, in one file that comes back
  echo "total $(( $(date +%s) - T0 ))s" >> "$RES/steps.txt"
  tar czf "$OUT/$CALL.tgz" --exclude=checkpoints --exclude='*.pt' -C /tmp/lease "$CALL"
  cp "$RES/steps.txt" "$OUT/$CALL-steps.txt"
  ls -la "$OUT"
}
