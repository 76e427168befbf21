#!/usr/bin/env bash
# Shared by the train_*.sh wrappers (Ascend ModelZoo convention). Each wrapper sets Network defaults,
# RankSize and its own train.py flags, then calls `run_training "$@"`.
#   --data_path=DIR    the data set folder or the folder above it (required)
#   --device_id=N      first device id (default 0); logs go to test/output/N/ ($TEST_OUTPUT_DIR/N/ when set)
#   --dataset=NAME     data set name (default DukeMTMC-reID); its recipe configs/<name>_256_resnet50.yml is read
#                      when there is one (the original's train script for that set)
#   --rank_size=N      devices for the multi-device wrappers (default: the wrapper's)
# Any other argument is passed to train.py unchanged (e.g. --SOLVER.MAX_EPOCHS 3).

test_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root_dir=$(dirname "$test_dir")
PYTHON=${PYTHON:-$( [ -x "$root_dir/.venv/bin/python" ] && echo "$root_dir/.venv/bin/python" || echo python3 )}

run_training() {
  local data_path="" device_id=0 dataset="DukeMTMC-reID" extra=() previous=""
  for arg in "$@"; do
    # a P or a backbone given to train.py directly is what the summary reports
    if [ "$previous" = "--SOLVER.IMS_PER_BATCH" ]; then BatchSize="$arg"; fi
    if [ "$previous" = "--MODEL.NAME" ]; then Network="CTL_$arg"; fi
    previous="$arg"
    case "$arg" in
      --data_path=*) data_path="${arg#*=}" ;;
      --device_id=*) device_id="${arg#*=}" ;;
      --dataset=*) dataset="${arg#*=}" ;;
      --rank_size=*) RankSize="${arg#*=}" ;;
      *) extra+=("$arg") ;;
    esac
  done
  if [ -z "$data_path" ]; then
    echo "error: --data_path=DIR is required (the data set folder, or the folder holding it)" >&2
    return 2
  fi
  # CANN's environment only where CANN is installed; elsewhere the same script runs on GPU or CPU.
  if [ -d /usr/local/Ascend ] && [ -f "$test_dir/env_npu.sh" ]; then source "$test_dir/env_npu.sh"; fi

  local out_dir="${TEST_OUTPUT_DIR:-$test_dir/output}/$device_id"
  mkdir -p "$out_dir"
  local log="$out_dir/train_${device_id}.log"
  local gpu_ids=$(seq -s ' ' "$device_id" $((device_id + RankSize - 1)))
  local launch=("$PYTHON")
  if [ "$RankSize" -gt 1 ]; then
    launch=("$PYTHON" -m torch.distributed.launch --nproc_per_node="$RankSize" --master_port="${MASTER_PORT:-29513}")
  fi
  cd "$root_dir" || return 1
  local recipe=()
  local name=$("$PYTHON" -c "import data, sys; print(data.canonical_name(sys.argv[1]))" "$dataset" 2>/dev/null)
  if [ -f "configs/${name}_256_resnet50.yml" ]; then recipe=(--config_file "configs/${name}_256_resnet50.yml"); fi
  local start=$(date +%s)
  echo "log: $log${recipe:+ (recipe ${recipe[1]})}"
  "${launch[@]}" train.py "${recipe[@]}" --DATASETS.NAMES "$dataset" --DATASETS.ROOT_DIR "$data_path" \
      --OUTPUT_DIR "$out_dir" --GPU_IDS $gpu_ids --SOLVER.IMS_PER_BATCH "$BatchSize" \
      "${train_flags[@]}" "${extra[@]}" > "$log" 2>&1
  local status=$?
  local e2e=$(( $(date +%s) - start ))
  if [ $status -ne 0 ]; then
    tail -n 20 "$log" >&2
    echo "error: training failed (exit $status); full log: $log" >&2
    return $status
  fi
  write_summary "$out_dir" "$e2e"
}

write_summary() {
  local out_dir=$1 e2e=$2
  local device_type=$("$PYTHON" -c "import utils; print(utils.pick_device_type('auto'))")
  CaseName="${Network}_bs${BatchSize}_${RankSize}p_acc"
  "$PYTHON" - "$out_dir/metrics.jsonl" "$out_dir/${CaseName}.log" "$e2e" <<PYEOF
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
evaluated = [r for r in rows if "centroid_mAP" in r]
summary = {
    "Network": "$Network", "RankSize": "$RankSize", "BatchSize": "$BatchSize", "DeviceType": "$device_type",
    "CaseName": "$CaseName",
    "ActualFPS": f"{last['images_per_s']:.2f}",               # real images/s over all devices
    "TrainingTime": f"{last['step_time_s'] * 1000:.2f}",      # ms per step
    "TrainAccuracy": f"{evaluated[-1]['centroid_mAP']:.5f}" if evaluated else "not evaluated",
    "ActualLoss": f"{last['loss']:.5f}",
    "E2ETrainingTime": sys.argv[3],                            # s, launch to exit
}
with open(sys.argv[2], "w") as f:
    f.writelines(f"{k} = {v}\n" for k, v in summary.items())
print(f"Final Performance images/sec : {summary['ActualFPS']}")
print(f"Final Train Accuracy : {summary['TrainAccuracy']}")
print(f"E2E Training Duration sec : {summary['E2ETrainingTime']}")
print(f"summary: {sys.argv[2]}")
PYEOF
}
