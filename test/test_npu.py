"""The Ascend path on a machine without an NPU: the torch_npu and apex test doubles (test/doubles) stand in for them
in subprocesses, and every NPU branch of the code runs: MODEL.DEVICE auto picking the NPU, set_device, hccl under
torch.distributed.launch, autocast on "npu", the NPU GradScaler, synchronize, apex O2, and the ModelZoo wrappers'
_perf summaries and loss files. Only the doubles' tensors are elsewhere: on the CPU, through utils.tensor_device."""
import json
import math
import os
import platform
import re
import sys

import pytest
from test_train import ROOT, read_metrics, run_script, tiny_flags

from support import utils

DOUBLES = os.path.join(ROOT, "test", "doubles")
SUMMARY_KEYS = ("Network", "RankSize", "BatchSize", "DeviceType", "Accelerator", "CaseName", "ActualFPS", "FPSSteps",
                "WarmupSteps", "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime")


def doubles_path(folder, *doubles):
    """A folder holding only the named doubles (and their call record), for PYTHONPATH: a test puts on the path
    exactly the stand-ins it wants."""
    os.makedirs(folder)
    for name in ("calls.py", *doubles):
        os.symlink(os.path.join(DOUBLES, name), os.path.join(folder, name))
    return str(folder)


def fake_cann(root, log):
    """A CANN installation of one set_env.sh, which says in the call record that the wrapper sourced it."""
    os.makedirs(root / "ascend-toolkit")
    (root / "ascend-toolkit" / "set_env.sh").write_text(f"echo '{{\"call\": \"cann set_env.sh\"}}' >> '{log}'\n")
    return str(root)


def read_calls(path):
    """The doubles' call record: a list of {"call", "pid", "rank", ...}."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_summary(path):
    with open(path) as f:
        return dict(line.rstrip("\n").split(" = ", 1) for line in f)


def run_wrapper(script, doubles, root, tmp, env, *flags):
    """bash test/<script> on the doubles, tiny (resnet18 at 64x32, K=2, one epoch, a logged step each step):
    (CompletedProcess, its output folder's parent, the call record)."""
    log = tmp / "calls.jsonl"
    env = {"PYTHON": sys.executable, "PYTHONPATH": doubles_path(tmp / "doubles", *doubles), "DOUBLES_LOG": str(log),
           "TEST_OUTPUT_DIR": str(tmp / "output"), "CANN_ROOT": fake_cann(tmp / "Ascend", log), **env}
    tiny = tiny_flags(root, "ignored")[6:]  # after the data set and output flags
    args = ["bash", f"test/{script}", f"--data_path={root}/synthetic", "--dataset=synthetic", *tiny,
            "--MODEL.DEVICE", "auto", "--SOLVER.MAX_EPOCHS", "1", "--SOLVER.LOG_PERIOD", "1", *flags]
    result = run_script(args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, tmp / "output", read_calls(log)


@pytest.fixture(scope="module")
def perf_1p(synthetic_root, tmp_path_factory):
    """One NPU, no apex: ASCEND_DEVICE_ID 7 in the environment, --device_id=3 on the command line."""
    return run_wrapper("train_performance_1p.sh", ["torch_npu"], synthetic_root, tmp_path_factory.mktemp("npu1"),
                       {"ASCEND_DEVICE_ID": "7", "MASTER_PORT": "29641"}, "--device_id=3",
                       "--SOLVER.IMS_PER_BATCH", "4")


@pytest.fixture(scope="module")
def perf_2p(synthetic_root, tmp_path_factory):
    """Two NPUs under torch.distributed.launch, with apex: ASCEND_DEVICE_ID 5 and RANK_SIZE 4 in the environment,
    --rank_size=2 on the command line."""
    return run_wrapper("train_performance_8p.sh", ["torch_npu", "apex"], synthetic_root,
                       tmp_path_factory.mktemp("npu2"), {"ASCEND_DEVICE_ID": "5", "RANK_SIZE": "4",
                                                         "MASTER_PORT": "29642"}, "--rank_size=2",
                       "--SOLVER.IMS_PER_BATCH", "2")


def steps_per_epoch(log_text):
    return int(re.search(r"(\d+) steps per epoch", log_text).group(1))


def train_log(out_dir, device_id):
    with open(out_dir / str(device_id) / f"train_{device_id}.log") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("run,device_id,ranks,P", [("perf_1p", 3, 1, 4), ("perf_2p", 5, 2, 2)])
def test_perf_wrappers_pick_the_npu_and_write_a_perf_summary_and_the_loss_file(run, device_id, ranks, P, request):
    result, out, calls = request.getfixturevalue(run)
    folder = out / str(device_id)  # the flag's device id over ASCEND_DEVICE_ID (7), or ASCEND_DEVICE_ID (5)
    case = f"CTL_resnet18_bs{P}_{ranks}p_perf"  # --rank_size=2 over RANK_SIZE=4
    summary = read_summary(folder / f"{case}.log")
    assert set(summary) == set(SUMMARY_KEYS) and all(summary[k] for k in SUMMARY_KEYS), summary
    assert summary["CaseName"] == case and summary["RankSize"] == str(ranks)
    assert summary["DeviceType"] == platform.machine() and summary["Accelerator"] == "npu"  # MODEL.DEVICE auto
    with open(folder / "steps.jsonl") as f:
        steps = [json.loads(line) for line in f]
    with open(folder / f"train_{case}_loss.txt") as f:
        losses = [float(line) for line in f]
    assert len(losses) == len(steps) == steps_per_epoch(train_log(out, device_id))  # SOLVER.LOG_PERIOD 1
    assert losses == pytest.approx([row["loss"] for row in steps], abs=1e-5) and all(map(math.isfinite, losses))
    assert float(summary["ActualLoss"]) == losses[-1]
    # ActualFPS leaves out the first epoch's warm-up (its first logged interval) and says how many steps it averaged
    assert int(summary["WarmupSteps"]) == steps[0]["steps"] == 1 and int(summary["FPSSteps"]) == len(steps) - 1
    timed = steps[1:]
    fps = sum(r["images_per_s"] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed)
    assert float(summary["ActualFPS"]) == pytest.approx(fps, abs=0.01) and fps > 0
    assert 0 < float(summary["TrainAccuracy"]) <= 1 and "Final Performance images/sec" in result.stdout
    assert {c["call"] for c in calls} >= {"import torch_npu", "set_device", "tensor_device", "cann set_env.sh"}
    set_devices = sorted(c["device"] for c in calls if c["call"] == "set_device")
    assert set_devices == [f"npu:{device_id + r}" for r in range(ranks)]  # GPU_IDS from the first device id


@pytest.mark.slow
def test_two_processes_under_torch_distributed_launch_ask_for_hccl_and_train_an_epoch(perf_2p):
    _, out, calls = perf_2p
    log = train_log(out, 5)
    hccl = [(c["rank"], c["size"]) for c in calls if c["call"] == "hccl"]
    assert sorted(hccl) == [(0, 2), (1, 2)]  # each rank's process group is hccl (the double's: gloo underneath)
    assert "2 device(s) (npu" in log and "identities disjoint across 2 ranks" in log
    rows = read_metrics(out / "5")
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and 0 < rows[0]["centroid_mAP"] <= 1


@pytest.mark.slow
def test_with_apex_initialize_runs_once_with_o2_and_scale_loss_every_step(perf_2p):
    _, out, calls = perf_2p
    log = train_log(out, 5)
    assert "precision: apex O2; mixed-precision backend apex (auto: an NPU with apex installed" in log
    for rank in (0, 1):
        initialize = [c for c in calls if c["call"] == "amp.initialize" and c["rank"] == rank]
        assert len(initialize) == 1 and initialize[0]["opt_level"] == "O2", initialize
        assert initialize[0]["loss_scale"] == "dynamic" and initialize[0]["optimizers"] == 2
        scaled = [c for c in calls if c["call"] == "amp.scale_loss" and c["rank"] == rank]
        assert len(scaled) == steps_per_epoch(log) > 0


@pytest.mark.slow
def test_without_apex_the_npu_run_says_it_uses_native_autocast(perf_1p):
    _, out, calls = perf_1p
    log = train_log(out, 3)
    said = [line for line in log.splitlines() if "mixed-precision backend" in line]
    assert len(said) == 1 and "native (auto: an NPU without apex, so native torch.autocast" in said[0], said
    assert said[0].startswith("precision: torch.float16")  # the double reports no bf16: fp16 with the GradScaler
    assert not [c for c in calls if c["call"].startswith("amp.")]
    assert {c["call"] for c in calls} >= {"autocast", "is_bf16_supported", "synchronize"}
    scalers = [c for c in calls if c["call"] == "GradScaler"]
    updates = [c for c in calls if c["call"] == "GradScaler.update"]
    assert scalers and scalers[0]["enabled"] and len(updates) == steps_per_epoch(log)  # the NPU scaler, each step


def test_amp_backend_auto_is_apex_o2_on_an_npu_with_apex_and_native_torch_autocast_elsewhere(monkeypatch):
    assert utils.amp_backend("auto", "cpu") == ("native", "auto: apex is for an NPU, this run is on cpu")
    assert utils.amp_backend("auto", "cuda")[0] == "native"
    assert utils.amp_backend("native", "npu") == ("native", "SOLVER.AMP_BACKEND native")
    assert utils.amp_backend("apex", "cpu") == ("apex", "SOLVER.AMP_BACKEND apex")  # asked for: setup_apex decides
    assert utils.amp_backend("auto", "npu", enabled=False)[0] == "native"  # USE_MIXED_PRECISION False: fp32
    backend, why = utils.amp_backend("auto", "npu")  # this process has no apex
    assert backend == "native" and "an NPU without apex" in why and "requirements-npu.txt" in why
    monkeypatch.setattr(utils, "import_apex_amp", lambda: object())
    assert utils.amp_backend("auto", "npu")[0] == "apex" and utils.amp_backend("auto", "cpu")[0] == "native"
    with pytest.raises(ValueError, match="'O2': expected one of auto, native, apex"):
        utils.amp_backend("O2", "npu")


def test_requirements_npu_pins_torch_npu_to_its_own_torch_release():
    with open(os.path.join(ROOT, "requirements-npu.txt")) as f:
        text = f.read()
    pins = dict(re.findall(r"^(torch|torch-npu|torchvision)==(\S+)$", text, re.M))
    pairs = re.findall(r"^#\s+torch==(\S+)\s+torch-npu==(\S+)\s+CANN", text, re.M)
    assert len(pairs) >= 5 and (pins["torch"], pins["torch-npu"]) in pairs
    for torch_version, npu_version in pairs:  # torch_npu's version is its torch's, with an optional .postN
        assert re.fullmatch(re.escape(torch_version) + r"(\.post\d+)?", npu_version), (torch_version, npu_version)
        assert (2, 4) <= tuple(map(int, torch_version.split(".")[:2])) <= (2, 14)  # requirements.txt's range
    minor = int(pins["torch"].split(".")[1])
    assert pins["torchvision"].startswith(f"0.{minor + 15}.")  # torchvision 0.N+15 goes with torch 2.N


# ---------------------------------------------------------------------------------------------------
# Every line of the code that names the NPU, and the run that reaches it

NPU_TEXT = re.compile(r"(?<![A-Za-z])npu")  # grep -n npu, without words such as "input"
SCANNED = sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) + \
    [os.path.join("support", f) for f in sorted(os.listdir(os.path.join(ROOT, "support"))) if f.endswith(".py")] + \
    [os.path.join("test", f) for f in sorted(os.listdir(os.path.join(ROOT, "test"))) if f.endswith(".sh")]

UTILS = "support/utils.py"
# (file, the line's text): what in the doubles' call record shows that a run went through it.
NPU_BRANCHES = {
    (UTILS, "def import_torch_npu():"): "import torch_npu",
    (UTILS, "import torch_npu  # noqa: F401  (registers torch.npu)"): "import torch_npu",
    (UTILS, "return torch_npu"): "import torch_npu",
    (UTILS, 'if requested in ("auto", "npu") and import_torch_npu() is not None and torch.npu.is_available():'):
        "is_available",
    (UTILS, 'return "npu"'): "set_device",  # only a device that is not the CPU is set
    (UTILS, 'if requested == "npu":'): "npu asked for, torch_npu missing",
    (UTILS, 'BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}'): "hccl",
    (UTILS, 'if device_type == "npu":'): "is_bf16_supported",
    (UTILS, 'is_supported = getattr(getattr(torch, "npu", None), "is_bf16_supported", None)'):
        "is_bf16_supported",
    (UTILS, 'if api != "npu":'): "amp.initialize",  # amp_backend's auto on an NPU
    (UTILS, 'if device_api(device) == "npu":'): "GradScaler",
    (UTILS, "import torch_npu  # noqa: F401"): "GradScaler",
    (UTILS, "return torch.npu.amp.GradScaler(enabled=needed)"): "GradScaler",
    ("test/common.sh", 'if [ -d "${CANN_ROOT:-/usr/local/Ascend}" ] && [ -f "$test_dir/env_npu.sh" ]; then source '
                       '"$test_dir/env_npu.sh"; fi'): "cann set_env.sh",
}
# The NPU branches that name their device type through a variable (getattr(torch, device_type)): grep cannot see
# them, so they are listed by hand.
API_BRANCHES = {
    (UTILS, "api.set_device(torch.device(device_type, ids[local_rank]))"): "set_device",
    (UTILS, "device = tensor_device(torch.device(device_type, ids[local_rank]))"): "tensor_device",
    (UTILS, "placed = torch.device(place(device.index))"): "tensor_device",
    (UTILS, "return torch.autocast(device_type=device_api(device), dtype=dtype)"): "autocast",
    (UTILS, "getattr(torch, api).synchronize(device)"): "synchronize",
    ("train.py", "setup_apex(state, cfg, device)"): "amp.initialize",
    ("train.py", "with state.apex_amp.scale_loss(total, state.optimizers) as scaled:"): "amp.scale_loss",
}
# Lines that only name the NPU: help texts, docstrings, comments, messages, the device names.
NPU_MENTIONS = {
    "bench.py": 1, "support/config.py": 2, "retrieve.py": 2, "train.py": 1, "test/common.sh": 1,
    UTILS: 16,  # the docstrings and comments of import_torch_npu, the seam and the AMP helpers; device names
}


def code_lines(path):
    """The stripped lines of a file, and those that name the NPU."""
    with open(os.path.join(ROOT, path)) as f:
        lines = [line.strip() for line in f]
    return lines, [line for line in lines if NPU_TEXT.search(line)]


@pytest.mark.slow
def test_every_npu_branch_is_named_and_reached(perf_1p, perf_2p):
    reached = {c["call"] for calls in (perf_1p[2], perf_2p[2]) for c in calls}
    with pytest.raises(utils.UserError, match="--MODEL.DEVICE npu: torch_npu is not installed"):
        utils.pick_device_type("npu")  # this process has no torch_npu, real or double
    reached.add("npu asked for, torch_npu missing")
    assert utils.pick_device_type("auto") != "npu"
    mentions = {}
    for path in SCANNED:
        lines, named = code_lines(path)
        branches = [line for file, line in NPU_BRANCHES if file == path]
        for line in branches + [line for file, line in API_BRANCHES if file == path]:
            assert line in lines, f"{path}: the listed branch {line!r} is not in the code any more"
        mentions[path] = len([line for line in named if line not in branches])
    assert {path: n for path, n in mentions.items() if n} == NPU_MENTIONS, \
        "a line naming the NPU was added or removed: list it in NPU_BRANCHES (a branch) or count it in NPU_MENTIONS"
    missed = {key: call for key, call in {**NPU_BRANCHES, **API_BRANCHES}.items() if call not in reached}
    assert not missed, f"NPU branches no test reached: {missed}"
