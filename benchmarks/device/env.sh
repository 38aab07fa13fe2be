# Sourced at the start of a device call, from the project root (see prepare.sh): offline settings, the carried
# wheels on the path, inductor's cache in one folder, and `step NAME LIMIT COMMAND...`, which runs COMMAND
# under a time limit with its output in $OUT/NAME.log and prints its exit status, seconds and last lines.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
pip install -q --no-index --no-deps --no-compile --target /tmp/site .axgpu/whl/*.whl --upgrade > /dev/null 2>&1 ||
  echo "env.sh: installing .axgpu/whl failed (run benchmarks/device/prepare.sh on the CPU machine)"
export PYTHONPATH=/tmp/site:$PWD/.axgpu/stubs:$PWD/plugin
mkdir -p "${OUT:=/tmp/out}"
step() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - start)) s"
  tail -25 "$OUT/$name.log"
}
