"""train.py: flags, schedule, a tiny two-epoch run, resume, SIGTERM, distributed launchers, the wrappers."""
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from run_outputs import ROOT, read_metrics, tiny_flags

import evaluate
import train
from support import config


def run_script(args, timeout=240, env=None):
    """Run a command from the repository root; returns the CompletedProcess (text)."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ---------------------------------------------------------------------------------------------------
# flags and schedule

def test_train_parses_the_configuration_and_its_own_options():
    cfg, opts, given = train.parse_args(["--MODEL.PRETRAINED", "FALSE", "SOLVER.BASE_LR", "0.001", "--resume", "auto",
                                         "--local_rank=1"])
    assert cfg.MODEL.PRETRAINED is False and cfg.SOLVER.BASE_LR == 0.001
    assert opts["resume"] == "auto" and opts["local_rank"] == "1" and given == {"MODEL.PRETRAINED", "SOLVER.BASE_LR"}


# ---------------------------------------------------------------------------------------------------
# training runs

def test_two_epochs_write_finite_metrics_and_both_checkpoints(one_process_run):
    rows = read_metrics(one_process_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("lr", "loss", "loss_centroid_triplet", "loss_triplet", "loss_xent", "loss_center",
                    "images_per_s", "step_time_s", "mAP", "rank1", "rank5", "rank10", "mINP",
                    "centroid_mAP", "centroid_rank1", "centroid_rank5", "centroid_rank10", "centroid_mINP"):
            assert math.isfinite(row[key]), key
        assert 0 < row["mAP"] <= 1 and 0 < row["centroid_mAP"] <= 1
    for name in ("last.pth", "best.pth"):
        state = torch.load(one_process_run / name, map_location="cpu", weights_only=True)
        assert {"model", "center_loss", "optimizer", "center_optimizer", "scheduler", "scaler", "epoch",
                "best_metric", "config", "sampler", "rng"} <= set(state)
    last = torch.load(one_process_run / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["next_epoch"] == 2 and last["config"]["MODEL.NAME"] == "resnet18"
    assert last["best_metric"] == max(r["centroid_mAP"] for r in rows)
    assert (one_process_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train.main(["--plot", str(one_process_run)]) == 0  # redraws it from metrics.jsonl
    numbered = torch.load(one_process_run / "checkpoint_epoch1.pth", map_location="cpu", weights_only=True)
    assert numbered["next_epoch"] == 1 and (one_process_run / "checkpoint_epoch2.pth").exists()


def test_tensorboard_holds_every_loss_term_lr_speed_metric_and_the_config(one_process_run):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(one_process_run), size_guidance={accumulator.TENSORS: 0})
    events.Reload()
    tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
    expected = {"loss/total", "loss/centroid_triplet", "loss/triplet", "loss/xent", "loss/center", "train/lr",
                "train/images_per_s"} | {f"{kind}/{metric}" for kind in ("image", "centroid")
                                          for metric in ("mAP", "rank1", "rank5", "rank10", "mINP")}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("centroid/mAP")] == [1, 2]
    assert any("config" in tag for tag in tags)


def test_device_augmentation_trains_and_evaluates(synthetic_root, tmp_path):
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "1", "--INPUT.DEVICE_AUGMENT", "true")
    assert train.main(flags) == 0
    row = read_metrics(tmp_path)[0]
    assert math.isfinite(row["loss"]) and 0 < row["centroid_mAP"] <= 1


def test_resume_auto_continues_at_the_next_epoch_with_the_right_lr(synthetic_root, one_process_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("last.pth", "metrics.jsonl"):
        (out / name).write_bytes((one_process_run / name).read_bytes())
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "3", "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[2]["lr"] == pytest.approx(3.5e-4 * 3 / 4)  # third warm-up epoch of four
    assert rows[1]["lr"] == pytest.approx(3.5e-4 * 2 / 4)


def test_a_resumed_run_applies_a_changed_lr_and_says_so(synthetic_root, one_process_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("last.pth", "metrics.jsonl"):
        (out / name).write_bytes((one_process_run / name).read_bytes())
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "3", "--resume", "auto",
                                 "--SOLVER.BASE_LR", "1e-3", "--SOLVER.CENTER_LR", "0.25")) == 0
    printed = capsys.readouterr().out
    assert "SOLVER.BASE_LR was 0.00035, now 0.001; SOLVER.CENTER_LR was 0.5, now 0.25: applied from here on" in printed
    assert read_metrics(out)[2]["lr"] == pytest.approx(1e-3 * 3 / 4)  # the new base at the schedule's place
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert saved["center_optimizer"]["param_groups"][0]["lr"] == 0.25
    assert saved["scheduler"]["base_lrs"] == [1e-3] * len(saved["optimizer"]["param_groups"])


def test_sigterm_mid_epoch_leaves_a_loadable_last_checkpoint(synthetic_root, tmp_path):
    # one identity per step and many images per identity: a long epoch to interrupt
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "50", "--SOLVER.IMS_PER_BATCH", "1")
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # the epoch-1 bar starts right after this line
        lines.append(line)
        if "steps per epoch" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "saved" in rest
    state = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    assert state["next_step"] > 0 or state["next_epoch"] > 0


@pytest.mark.parametrize("launcher", [["-m", "torch.distributed.run"], ["-m", "torch.distributed.launch"]])
def test_two_process_cpu_runs_complete_with_disjoint_identities(synthetic_root, tmp_path, launcher):
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "1", "--SOLVER.IMS_PER_BATCH", "2")
    port = "29611" if "run" in launcher[1] else "29612"
    result = run_script([sys.executable, *launcher, "--nproc_per_node=2", f"--master_port={port}", "train.py", *flags])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 device(s)" in result.stdout and "identities disjoint across 2 ranks" in result.stdout
    rows = read_metrics(tmp_path)
    assert len(rows) == 1 and math.isfinite(rows[0]["centroid_mAP"])
    # the sharded, gathered evaluation equals a one-process evaluation of the saved model
    results = evaluate.evaluate_command(["--MODEL.PRETRAIN_PATH", str(tmp_path / "last.pth"),
                                         "--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR", synthetic_root,
                                         "--DATALOADER.NUM_WORKERS", "0"])
    assert results["image"]["mAP"] == pytest.approx(rows[0]["mAP"], abs=1e-6)
    assert results["centroid"]["mAP"] == pytest.approx(rows[0]["centroid_mAP"], abs=1e-6)


def test_missing_data_set_and_bad_values_fail_with_clear_messages(tmp_path):
    result = run_script([sys.executable, "train.py", "--DATASETS.NAMES", "market1501",
                         "--DATASETS.ROOT_DIR", str(tmp_path / "nowhere"), "--MODEL.DEVICE", "cpu"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr
    result = run_script([sys.executable, "train.py", "--SOLVER.IMS_PER_BATH", "16"])
    assert result.returncode == 2 and "did you mean SOLVER.IMS_PER_BATCH" in result.stderr
    result = run_script([sys.executable, "train.py", "--SOLVER.AMP_DTYPE", "fp8"])
    assert result.returncode == 2 and "choose one of auto, fp16, bf16" in result.stderr
    assert "Traceback" not in result.stderr


def test_apex_backend_without_apex_says_what_is_missing(synthetic_root, tmp_path):
    result = run_script([sys.executable, "train.py", *tiny_flags(synthetic_root, tmp_path),
                         "--SOLVER.AMP_BACKEND", "apex"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "apex is not installed" in result.stderr and "--SOLVER.AMP_BACKEND native" in result.stderr


# ---------------------------------------------------------------------------------------------------
# the Ascend-style wrappers (the train_performance_* ones run on the NPU doubles: test_npu.py)

SUMMARY_KEYS = ("Network", "RankSize", "BatchSize", "DeviceType", "Accelerator", "CaseName", "ActualFPS", "FPSSteps",
                "WarmupSteps", "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime")


@pytest.mark.parametrize("script,rank_size", [("train_full_1p.sh", 1), ("train_full_8p.sh", 2)])
def test_wrappers_run_on_the_cpu_and_fill_every_summary_key(synthetic_root, script, rank_size, tmp_path):
    device_id = {"train_full_1p.sh": 92, "train_full_8p.sh": 94}[script]
    tiny = tiny_flags(synthetic_root, "ignored")[6:]  # everything after data set and output flags
    # the 1-device wrapper reads the Market recipe (configs/market1501_256_resnet50.yml)
    recipe = script == "train_full_1p.sh"
    dataset = ["--dataset=market1501", "--MODEL.PRETRAIN_PATH", "", "--MODEL.BACKBONE_EMB_SIZE", "0"] if recipe \
        else ["--dataset=synthetic"]
    args = ["bash", f"test/{script}", f"--data_path={synthetic_root}/synthetic", f"--device_id={device_id}",
            *dataset, *tiny, "--SOLVER.MAX_EPOCHS", "1", "--SOLVER.IMS_PER_BATCH", "2"]
    if rank_size > 1:
        args.append(f"--rank_size={rank_size}")
    result = run_script(args, env={"MASTER_PORT": str(29620 + device_id), "TEST_OUTPUT_DIR": str(tmp_path),
                                   "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Final Performance images/sec" in result.stdout
    out_dir = os.path.join(tmp_path, str(device_id))
    case = f"CTL_resnet18_bs2_{rank_size}p_acc"  # the backbone and P the flags asked for; train_full_*: _acc
    with open(os.path.join(out_dir, f"{case}.log")) as f:
        summary = dict(line.rstrip("\n").split(" = ", 1) for line in f)
    assert set(SUMMARY_KEYS) <= set(summary) and all(summary[k] for k in SUMMARY_KEYS)
    assert float(summary["ActualFPS"]) > 0 and 0 < float(summary["TrainAccuracy"]) <= 1
    assert summary["RankSize"] == str(rank_size) and summary["Accelerator"] == "cpu"
    assert summary["DeviceType"] == platform.machine()  # uname -m, as ModelZoo's wrappers write it
    with open(os.path.join(out_dir, f"train_{case}_loss.txt")) as f:
        assert float(f.read().split()[-1]) == float(summary["ActualLoss"])
    assert os.path.exists(os.path.join(out_dir, f"train_{device_id}.log"))
    written, _, _ = config.parse(["--config_file", os.path.join(out_dir, "config.yaml")])
    # the recipe's own values (the rest are overridden by the wrapper and the tiny flags)
    assert written.DATALOADER.USE_RESAMPLING is not recipe and written.USE_MIXED_PRECISION is not recipe


# ---------------------------------------------------------------------------------------------------
# the original's command lines and keys, run

SHORT_RUN = ["MODEL.NAME", "resnet18", "MODEL.BACKBONE_EMB_SIZE", "512", "MODEL.PRETRAIN_PATH", "",
             "MODEL.PRETRAINED", "False", "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64, 32]",
             "INPUT.SIZE_TEST", "[64, 32]", "SOLVER.MAX_EPOCHS", "1", "SOLVER.IMS_PER_BATCH", "4",
             "TEST.IMS_PER_BATCH", "32", "DATALOADER.NUM_WORKERS", "0"]


def duke_layout(market_folder, out):
    """The synthetic Market-named set renamed to DukeMTMC-reID's pattern (0005_c2_f0046985.jpg)."""
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        os.makedirs(os.path.join(out, sub))
        for name in os.listdir(os.path.join(market_folder, sub)):
            pid, cam, frame = name.split("_")[0], name.split("_")[1][1], name.split("_")[2]
            os.link(os.path.join(market_folder, sub, name), os.path.join(out, sub, f"{pid}_c{cam}_f{frame}.jpg"))
    return out


def coco_layout(market_folder, images, annotations, size_tag):
    """The synthetic set as the original's fashion layout: images/{train,query,gallery}/ and
    annotations/{train,query,gallery}_<size>.json with pair_id per annotation (junk and distractors left out)."""
    os.makedirs(annotations)
    for split, sub in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        os.makedirs(os.path.join(images, split))
        names = [n for n in sorted(os.listdir(os.path.join(market_folder, sub))) if int(n.split("_")[0]) > 0]
        for name in names:
            os.link(os.path.join(market_folder, sub, name), os.path.join(images, split, name))
        coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": i, "image_id": i, "pair_id": int(n.split("_")[0]),
                                 "source": "user" if split == "query" else "shop"} for i, n in enumerate(names)]}
        with open(os.path.join(annotations, f"{split}_{size_tag}.json"), "w") as f:
            json.dump(coco, f)
    return os.path.join(annotations, f"train_{size_tag}.json")


def script_for(recipe, root, json_path, out):
    """The original's train script for a recipe with its data and output paths pointed here."""
    from test_config import ORIGINAL_SCRIPTS
    tokens = shlex.split(ORIGINAL_SCRIPTS[recipe])
    replace = {"DATASETS.ROOT_DIR": root, "DATASETS.JSON_TRAIN_PATH": json_path, "OUTPUT_DIR": str(out)}
    return [replace.get(tokens[i - 1], t) if i else t for i, t in enumerate(tokens)]


@pytest.mark.parametrize("recipe", ["market1501_256_resnet50.yml", "dukemtmcreid_256_resnet50.yml",
                                    "df1_256_resnet50.yml", "street2shop_256_resnet50.yml"])
def test_the_originals_train_scripts_run_with_train_py(recipe, synthetic_root, tmp_path, monkeypatch):
    from test_config import expected_values
    market = os.path.join(synthetic_root, "synthetic")
    root, json_path = market, ""
    if recipe.startswith("duke"):
        root = duke_layout(market, str(tmp_path / "duke"))
    elif not recipe.startswith("market"):
        root = str(tmp_path / "64_32_images")
        json_path = coco_layout(market, root, str(tmp_path / "annotations"), "64_32")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert train.main(script_for(recipe, root, json_path, out) + SHORT_RUN) == 0
    written, _, _ = config.parse(["--config_file", str(out / "config.yaml")])
    short = set(SHORT_RUN[::2])
    for key, value in expected_values(recipe).items():
        if key not in short | {"DATASETS.ROOT_DIR", "DATASETS.JSON_TRAIN_PATH", "OUTPUT_DIR"}:
            assert written[key] == value, key
    row = read_metrics(out)[0]
    assert 0 < row["mAP"] <= 1 and 0 < row["centroid_mAP"] <= 1  # EVAL_PERIOD 40: the last epoch is evaluated


def test_passing_config_yaml_back_repeats_the_run_exactly(synthetic_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(tiny_flags(synthetic_root, first, "--SOLVER.MAX_EPOCHS", "1")) == 0
    assert train.main(["--config_file", str(first / "config.yaml"), "OUTPUT_DIR", str(second)]) == 0
    timing = ("images_per_s", "step_time_s", "data_time_s")
    rows = [{k: v for k, v in read_metrics(out)[0].items() if k not in timing} for out in (first, second)]
    assert rows[0] == rows[1]
    assert (first / "config.yaml").read_text().replace(str(first), str(second)) == (second / "config.yaml").read_text()


def test_only_test_evaluates_the_weight_and_draws_ranked_lists(synthetic_root, one_process_run, tmp_path, capsys):
    flags = tiny_flags(synthetic_root, tmp_path, "TEST.ONLY_TEST", "True", "TEST.WEIGHT",
                       str(one_process_run / "last.pth"), "TEST.VISUALIZE", "yes", "TEST.VISUALIZE_MAX_NUMBER", "3",
                       "TEST.VISUALIZE_TOPK", "4", "TEST.CENTROID_PROTOCOL", "all")
    assert train.main(flags) == 0
    out = capsys.readouterr().out
    last = read_metrics(one_process_run)[-1]
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()
            if line.startswith(("per image", "centroid "))}
    assert f"{100 * last['mAP']:7.2f}" in rows["per image"]
    assert f"{100 * last['centroid_mAP']:7.2f}" in rows["centroid standard"]  # the default protocol while training
    assert {"centroid original", "centroid original_fixed"} <= set(rows) and "centroid protocols:" in out
    pictures = sorted(os.listdir(tmp_path / "visualize"))
    assert len(pictures) == 4 and "cmc.png" in pictures  # 3 ranked lists and the CMC curves
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_training_continues_the_checkpoint_in_pretrain_path(synthetic_root, one_process_run, tmp_path):
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "3", "MODEL.RESUME_TRAINING", "True",
                       "MODEL.PRETRAIN_PATH", str(one_process_run / "last.pth"))
    assert train.main(flags) == 0
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [3] and rows[0]["lr"] == pytest.approx(3.5e-4 * 3 / 4)


def test_reproducible_runs_each_seed_and_print_mean_and_std(synthetic_root, tmp_path, capsys):
    # P=8: every identity in one step, so each seeded run is one update and its evaluation
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "1", "--SOLVER.IMS_PER_BATCH", "8",
                       "REPRODUCIBLE", "True", "REPRODUCIBLE_NUM_RUNS", "2", "REPRODUCIBLE_SEED", "5")
    assert train.main(flags) == 0
    out = capsys.readouterr().out
    runs = [read_metrics(tmp_path / f"run_{seed}")[0] for seed in (5, 6)]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    for key in ("mAP", "rank1", "centroid_mAP", "centroid_rank1"):
        values = [r[key] for r in runs]
        assert summary[key]["mean"] == pytest.approx(sum(values) / 2)
        assert summary[key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert f"{100 * summary[key]['mean']:6.2f} +- {100 * summary[key]['std']:5.2f}" in out
    assert runs[0]["loss"] != runs[1]["loss"]  # different seeds, different runs


def test_cuda_graph_is_refused_cleanly_where_it_cannot_run(synthetic_root, tmp_path, capsys):
    flags = tiny_flags(synthetic_root, tmp_path, "--SOLVER.MAX_EPOCHS", "1", "SOLVER.CUDA_GRAPH", "true")
    assert train.main(flags) == 2
    assert "error: SOLVER.CUDA_GRAPH true: CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "last.pth").exists()
