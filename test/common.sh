#!/usr/bin/env bash
# Shared by the train_*.sh wrappers (Ascend ModelZoo conventions). Each wrapper sets Network, RankSize, BatchSize,
# CaseKind (perf or acc) and its own train.py flags, then calls `run_training "$@"`.
#   --data_path=DIR    the data set folder or the folder above it (required)
#   --device_id=N      first device id (default: $ASCEND_DEVICE_ID, else 0); logs go to test/output/N/
#                      ($TEST_OUTPUT_DIR/N/ when set)
#   --dataset=NAME     data set name (default DukeMTMC-reID); its recipe configs/<name>_256_resnet50.yml is read
#                      when there is one (the original's train script for that set)
#   --rank_size=N      devices (default: the wrapper's; the 8p wrappers take $RANK_SIZE when set)
# Any other argument is passed to train.py unchanged (e.g. --SOLVER.MAX_EPOCHS 3).

test_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root_dir=$(dirname "$test_dir")
PYTHON=${PYTHON:-$( [ -x "$root_dir/.venv/bin/python" ] && echo "$root_dir/.venv/bin/python" || echo python3 )}

run_training() {
  local data_path="" device_id=${ASCEND_DEVICE_ID:-0} dataset="DukeMTMC-reID" extra=() previous="" resuming=0
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
      --resume|--resume=*) resuming=1; extra+=("$arg") ;;
      *) extra+=("$arg") ;;
    esac
  done
  if [ -z "$data_path" ]; then
    echo "error: --data_path=DIR is required (the data set folder, or the folder holding it)" >&2
    return 2
  fi
  # CANN's environment only where CANN is installed ($CANN_ROOT, default /usr/local/Ascend); elsewhere the same
  # script runs on GPU or CPU.
  if [ -d "${CANN_ROOT:-/usr/local/Ascend}" ] && [ -f "$test_dir/env_npu.sh" ]; then source "$test_dir/env_npu.sh"; fi

  local out_dir="${TEST_OUTPUT_DIR:-$test_dir/output}/$device_id"
  mkdir -p "$out_dir"
  # a new run's loss file and speed read only its own steps (a resumed run continues its logs)
  if [ "$resuming" = 0 ]; then rm -f "$out_dir/metrics.jsonl" "$out_dir/steps.jsonl"; fi
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
  CaseName="${Network}_bs${BatchSize}_${RankSize}p_${CaseKind}"
  "$PYTHON" - "$out_dir" "$CaseName" "$e2e" "$Network" "$RankSize" "$BatchSize" "$(uname -m)" <<'PYEOF'
import json, os, sys

out_dir, case, e2e, network, rank_size, batch_size, machine = sys.argv[1:]
read = lambda name: [json.loads(line) for line in open(os.path.join(out_dir, name))]  # noqa: E731
epochs, steps = read("metrics.jsonl"), read("steps.jsonl")
if not steps:
    sys.exit(f"error: {out_dir}/steps.jsonl logs no training step: the run trained nothing to summarise")
evaluated = [r for r in epochs if "centroid_mAP" in r]
# warm-up: the first epoch's first logged interval (SOLVER.LOG_PERIOD steps; an NPU compiles its operators then),
# unless that is all the run logged
timed = steps[1:] if len(steps) > 1 else steps
warmup = sum(r["steps"] for r in steps) - sum(r["steps"] for r in timed)
seconds, images = sum(r["seconds"] for r in timed), sum(r["images_per_s"] * r["seconds"] for r in timed)
with open(os.path.join(out_dir, f"train_{case}_loss.txt"), "w") as f:
    f.writelines(f"{r['loss']:.5f}\n" for r in steps)  # every logged step's loss
summary = {
    "Network": network, "RankSize": rank_size, "BatchSize": batch_size,
    "DeviceType": machine,                                      # uname -m, as ModelZoo writes it
    "Accelerator": steps[-1]["device"],                         # the run's device type: npu, cuda or cpu
    "CaseName": case,
    "ActualFPS": f"{images / seconds:.2f}",                     # real images/s over all devices, loading included
    "FPSSteps": str(sum(r["steps"] for r in timed)),            # the steps ActualFPS and TrainingTime average
    "WarmupSteps": str(warmup),                                 # the first epoch's first steps, left out
    "TrainingTime": f"{1000 * seconds / sum(r['steps'] for r in timed):.2f}",  # ms per step
    "TrainAccuracy": f"{evaluated[-1]['centroid_mAP']:.5f}" if evaluated else "not evaluated",
    "ActualLoss": f"{steps[-1]['loss']:.5f}",                   # the last logged step's loss
    "E2ETrainingTime": e2e,                                     # s, launch to exit
}
with open(os.path.join(out_dir, f"{case}.log"), "w") as f:
    f.writelines(f"{k} = {v}\n" for k, v in summary.items())
print(f"Final Performance images/sec : {summary['ActualFPS']} (mean of {summary['FPSSteps']} steps after "
      f"{summary['WarmupSteps']} warm-up steps)")
print(f"Final Train Accuracy : {summary['TrainAccuracy']}")
print(f"E2E Training Duration sec : {summary['E2ETrainingTime']}")
print(f"summary: {os.path.join(out_dir, case + '.log')}; loss of every logged step: train_{case}_loss.txt")
PYEOF
}
