"""Faults a long run meets: bad images (before and during training), checkpoints that do not fit or are damaged,
an output folder that cannot take a checkpoint, a dead rank or a signal in a distributed run, a malformed flag."""
import datetime
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from run_outputs import TIMING, assert_same_weights, free_port, rank_env, read_metrics, run_ranks, tiny_flags, weights

import data
import train
from data import build_datasets, build_train_loader
from support import faults, image_check, transforms, utils
from support.specs import AugmentSpec, BatchSpec, LoaderSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_cache_and_signals(tmp_path, monkeypatch):
    """Each test its own image-check cache; train.main's signal handlers undone afterwards."""
    monkeypatch.setenv(image_check.CACHE_DIR_ENV, str(tmp_path / "cache"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    faults.STOP_SIGNAL.update(signum=None, time=0.0)


def copy_of(root, tmp_path):
    """A private copy of the data set, to damage."""
    shutil.copytree(root, tmp_path / "data")
    return str(tmp_path / "data")


def error_lines(text):
    """The lines that say error:, and a check that no traceback came with them."""
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if "error:" in line]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def break_image(path, how):
    """Damage a file as the issue's users met it: truncated, emptied, or text under a .jpg name."""
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write({"truncate": content[: len(content) // 2], "empty": b"", "text": b"not an image\n"}[how])
    return content


def split_paths(root, split):
    """Paths of a split's images the run uses (junk files, pid -1, are not read)."""
    return [path for path, _, _ in build_datasets("synthetic", root)[split]]


def epoch_batches(root):
    """Epoch 1's batches of dataset indices, as tiny_flags() trains them: (train items, batches)."""
    items = build_datasets("synthetic", root)["train"]
    _, sampler = build_train_loader(items, LoaderSpec(BatchSpec(4, 2), AugmentSpec((64, 32))))
    sampler.set_epoch(0)
    return items, list(sampler)


def train_path_at(root, step):
    """The first image of step `step` of epoch 1 that no earlier step of the epoch uses."""
    items, batches = epoch_batches(root)
    earlier = {i for batch in batches[:step] for i in batch}
    return next(items[i][0] for i in batches[step] if i not in earlier)


# ---------------------------------------------------------------------------------------------------
# 1. the check of every image before the first step

def test_bad_images_are_listed_before_training_and_nothing_is_written(synthetic_root, tmp_path, capsys):
    root = copy_of(synthetic_root, tmp_path)
    broken = [split_paths(root, "train")[3], split_paths(root, "gallery")[0], split_paths(root, "query")[0]]
    for path, how in zip(broken, ("truncate", "empty", "text")):
        break_image(path, how)
    out = tmp_path / "out"
    assert train.main(tiny_flags(root, out)) == 2
    err = capsys.readouterr().err
    total = len(image_check.dataset_paths(build_datasets("synthetic", root)))
    assert len(error_lines(err)) == 1 and f"3 of {total}" in err
    for path in broken:
        assert f"  {path}: " in err
    assert f"python data.py check {root} --dataset synthetic" in err
    assert not out.exists()  # no config.yaml, no checkpoint, no folder
    assert all(name.endswith(".jpg") for _, _, names in os.walk(root) for name in names)  # no cache in the data


def test_the_check_is_remembered_until_a_file_changes(synthetic_root, tmp_path, capsys):
    root = copy_of(synthetic_root, tmp_path)
    dataset = build_datasets("synthetic", root)
    assert image_check.preflight_check(dataset, progress=False) == []
    assert "checked in" in capsys.readouterr().out
    assert os.path.dirname(image_check.check_cache_path()) == str(tmp_path / "cache")
    assert image_check.preflight_check(dataset, progress=False) == []
    assert "decoded in an earlier check" in capsys.readouterr().out
    path = split_paths(root, "query")[1]
    break_image(path, "truncate")  # same name, new size and mtime: checked again, and found
    bad = image_check.preflight_check(dataset, progress=False)
    assert [p for p, _ in bad] == [path] and "checked in" in capsys.readouterr().out


def test_the_report_names_the_first_20_bad_files_and_counts_the_rest():
    bad = [(f"/d/{i:03d}.jpg", "truncated") for i in range(25)]
    lines = image_check.bad_images_report(bad, 1000, ["market1501"], "/d").splitlines()
    assert lines[0] == "25 of 1000 images cannot be read:" and lines[1] == "  /d/000.jpg: truncated"
    assert lines[20] == "  /d/019.jpg: truncated" and lines[21] == "  ... and 5 more"
    assert lines[22] == "list them all with: python data.py check /d --dataset market1501"


def test_check_images_false_skips_the_check(synthetic_root, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(faults, "preflight_check", lambda *a, **k: calls.append(a) or [])
    cfg, _, _ = train.parse_args(tiny_flags(synthetic_root, tmp_path, "--DATALOADER.CHECK_IMAGES", "false"))
    dataset = build_datasets("synthetic", synthetic_root)
    assert faults.check_images_before_training(cfg, dataset, 0) == (dataset, []) and calls == []


@pytest.mark.slow
# ---------------------------------------------------------------------------------------------------
# 2. a file that goes bad mid-run

def test_a_bad_train_image_mid_run_stops_at_its_step_and_the_resumed_run_equals_an_uninterrupted_one(
        synthetic_root, one_process_run, tmp_path, capsys):
    root = copy_of(synthetic_root, tmp_path)
    path = train_path_at(root, 2)
    good = break_image(path, "truncate")
    out = tmp_path / "out"
    # the check is off: the file is met by the loader, as one that changes on disk after the check would be
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "2", "--DATALOADER.CHECK_IMAGES", "false")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and path in lines[0] and "epoch 1, step 2" in lines[0]
    assert f"python train.py --config_file {out}/config.yaml --resume auto" in lines[0]
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert (saved["next_epoch"], saved["next_step"]) == (0, 2)
    with open(path, "wb") as f:
        f.write(good)
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "2", "--resume", "auto")) == 0
    assert_same_weights(weights(out / "last.pth"), weights(one_process_run / "last.pth"))
    resumed, reference = read_metrics(out)[-1], read_metrics(one_process_run)[-1]
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in reference.items() if k not in TIMING}


@pytest.mark.slow
def test_a_bad_gallery_image_stops_after_the_epochs_training_and_resumes_at_its_evaluation(
        synthetic_root, one_process_run, tmp_path, capsys):
    root = copy_of(synthetic_root, tmp_path)
    path = split_paths(root, "gallery")[5]
    good = break_image(path, "empty")
    out = tmp_path / "out"
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "2", "--DATALOADER.CHECK_IMAGES", "false")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and path in lines[0] and "the evaluation after epoch 1" in lines[0]
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert (saved["next_epoch"], saved["next_step"]) == (0, len(epoch_batches(root)[1])) and "epoch_stats" in saved
    assert not (out / "metrics.jsonl").exists()
    with open(path, "wb") as f:
        f.write(good)
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "2", "--resume", "auto")) == 0
    assert_same_weights(weights(out / "last.pth"), weights(one_process_run / "last.pth"))
    rows, reference = read_metrics(out), read_metrics(one_process_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == reference[0]["loss"] and rows[0]["mAP"] == reference[0]["mAP"]


@pytest.mark.slow
def test_skip_bad_replaces_train_images_and_leaves_out_query_and_gallery_ones(synthetic_root, tmp_path, capsys):
    root = copy_of(synthetic_root, tmp_path)
    broken = [train_path_at(root, 1), split_paths(root, "query")[2], split_paths(root, "gallery")[3]]
    for path in broken:
        break_image(path, "text")
    out = tmp_path / "out"
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "1", "--DATALOADER.CHECK_IMAGES", "false",
                                 "--DATALOADER.SKIP_BAD", "true")) == 0
    captured = capsys.readouterr()
    assert error_lines(captured.err) == []
    with open(out / "skipped.txt") as f:
        assert sorted(line.split("\t")[0] for line in f) == sorted(broken)
    assert read_metrics(out)[0]["skipped_images"] == 3
    num_queries = len(split_paths(root, "query"))
    per_image = [line for line in captured.out.splitlines() if line.startswith("per image")][-1]
    assert per_image.split()[-1] == str(num_queries - 1)  # the results table counts the queries evaluated


def test_skip_bad_leaves_out_what_the_check_found(synthetic_root, tmp_path):
    root = copy_of(synthetic_root, tmp_path)
    broken = [split_paths(root, "train")[0], split_paths(root, "query")[0]]
    for path in broken:
        break_image(path, "empty")
    cfg, _, _ = train.parse_args(tiny_flags(root, tmp_path / "out", "--DATALOADER.SKIP_BAD", "true"))
    dataset = build_datasets("synthetic", root)
    kept, bad = faults.check_images_before_training(cfg, dataset, 0)
    assert sorted(p for p, _ in bad) == sorted(broken)
    assert not set(broken) & set(image_check.dataset_paths(kept))
    assert len(kept["train"]) == len(dataset["train"]) - 1 and kept["num_train_pids"] == dataset["num_train_pids"]


def test_guarded_images_replace_with_the_same_identity_and_its_augmentation_seed(synthetic_root, tmp_path):
    root = copy_of(synthetic_root, tmp_path)
    items = build_datasets("synthetic", root)["train"]
    same = [i for i, item in enumerate(items) if item[1] == items[0][1]]
    break_image(items[same[0]][0], "truncate")
    log = tmp_path / "skipped.txt"
    images = data.ImageDataset(items, transforms.build_train_transform(AugmentSpec((64, 32))))
    guarded = image_check.GuardedImages(images, image_check.UnreadableImages(skip=True, log_dir=str(tmp_path)))
    image, pid, _ = guarded[(same[0], 1234)]  # as a training loader asks: (index, augmentation seed)
    assert pid == items[0][1] and torch.equal(image, images[(same[1], 1234)][0])  # the next image, the same draws
    assert log.read_text().startswith(items[same[0]][0] + "\t")
    for i in same:
        break_image(items[i][0], "empty")
    with pytest.raises(utils.DataError, match="nor any other"):
        guarded[same[1]]


def test_one_policy_decides_words_and_logs_an_unreadable_image(tmp_path, capsys):
    path = str(tmp_path / "a.jpg")
    (tmp_path / "a.jpg").write_bytes(b"not an image\n")
    load = lambda: data.load_image(path)  # noqa: E731
    with pytest.raises(utils.DataError, match=r"^cannot read image .*a\.jpg \(.+\): replace or delete it, or pass "
                                              r"--skip-bad to leave out unreadable images$"):
        image_check.UnreadableImages(fix="pass --skip-bad").read(path, load)
    skipping = image_check.UnreadableImages(skip=True, log_dir=str(tmp_path / "out"))
    assert skipping.read(path, load) is None and skipping.read(path, load) is None  # met twice, logged once
    assert skipping.count_skipped() == 1 and capsys.readouterr().err.count(f"warning: skipped {path}: ") == 1
    assert image_check.UnreadableImages(skip=True).read(path, load) is None and capsys.readouterr().err == ""
    cfg, _, _ = train.parse_args(tiny_flags("/d", tmp_path / "run", "--DATALOADER.SKIP_BAD", "true"))
    policy = image_check.UnreadableImages.from_config(cfg)
    assert policy == image_check.UnreadableImages(skip=True, log_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# 3. resuming a checkpoint that does not fit

def copy_run(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("last.pth", "best.pth"):
        shutil.copy(run_dir / name, out / name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("change,names", [
    (["--MODEL.NAME", "resnet34"], ["MODEL.NAME is resnet18 in the checkpoint but resnet34", "another backbone"]),
    (["--SOLVER.IMS_PER_BATCH", "2"], ["SOLVER.IMS_PER_BATCH is 4 in the checkpoint but 2",
                                       "--SOLVER.IMS_PER_BATCH 4"]),
    (["--DATALOADER.NUM_INSTANCE", "3"], ["DATALOADER.NUM_INSTANCE is 2 in the checkpoint but 3"]),
    ("one identity fewer", ["classifier has 8 classes", "7 identities"]),
])
def test_resuming_a_checkpoint_of_another_run_says_which_key_differs(synthetic_root, one_process_run, tmp_path, capsys,
                                                                     change, names):
    out = copy_run(one_process_run, tmp_path)
    root = synthetic_root
    if change == "one identity fewer":
        root = copy_of(synthetic_root, tmp_path)
        items = build_datasets("synthetic", root)["train"]
        for path, pid, _ in items:
            if pid == items[0][1]:
                os.remove(path)
        change = []
    before = digest(out / "last.pth")
    assert train.main(tiny_flags(root, out, "--SOLVER.MAX_EPOCHS", "2", "--resume", "auto", *change)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and all(name in lines[0] for name in names), lines
    assert "--MODEL.PRETRAIN_PATH" in lines[0] and digest(out / "last.pth") == before
    assert not (out / "config.yaml").exists()


@pytest.mark.slow
def test_another_max_epochs_is_allowed_and_said(synthetic_root, one_process_run, tmp_path, capsys):
    out = copy_run(one_process_run, tmp_path)
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "1", "--resume", "auto")) == 0
    assert "SOLVER.MAX_EPOCHS was 2, now 1: nothing is left to train" in capsys.readouterr().out


@pytest.mark.slow
def test_a_truncated_last_checkpoint_is_refused_and_best_is_offered(synthetic_root, one_process_run, tmp_path, capsys):
    out = copy_run(one_process_run, tmp_path)
    with open(out / "last.pth", "r+b") as f:
        f.truncate(os.path.getsize(out / "last.pth") // 3)
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "2", "--resume", "auto")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{out}/last.pth is damaged" in lines[0] and "--resume best" in lines[0]
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "2", "--resume", "best")) == 0
    assert f"resumed from {out}/best.pth" in capsys.readouterr().out
    torch.save({"model": weights(one_process_run / "last.pth")}, out / "weights.pth")
    assert train.main(tiny_flags(synthetic_root, out, "--resume", str(out / "weights.pth"))) == 2
    assert "holds weights but no training state" in error_lines(capsys.readouterr().err)[0]


# ---------------------------------------------------------------------------------------------------
# 4. an output folder that cannot take a checkpoint

def test_an_unwritable_output_dir_is_found_before_training(synthetic_root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    assert train.main(tiny_flags(synthetic_root, out)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"--OUTPUT_DIR {out} cannot take a checkpoint" in lines[0]


@pytest.fixture
def file_size_limit():
    """Set a file-size limit on this process (writes past it fail as on a full disk); restored afterwards."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda nbytes: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_is_found_before_training(synthetic_root, tmp_path, capsys, file_size_limit):
    out = tmp_path / "out"
    file_size_limit(8 << 20)  # a resnet18 checkpoint needs ~135 MB
    assert train.main(tiny_flags(synthetic_root, out)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot take a checkpoint" in lines[0] and "File too large" in lines[0]
    assert os.listdir(out) == []


@pytest.mark.slow
def test_a_save_that_fails_mid_run_keeps_the_last_checkpoint(synthetic_root, one_process_run, tmp_path, capsys,
                                                             monkeypatch, file_size_limit):
    out = copy_run(one_process_run, tmp_path)
    before = digest(out / "last.pth")
    check = faults.check_output_dir
    monkeypatch.setattr(faults, "check_output_dir", lambda *a: (check(*a), file_size_limit(8 << 20)))
    assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "3", "--resume", "auto")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"cannot write {out}/last.pth (File too large)" in lines[0]
    assert f"{out}/last.pth from " in lines[0] and "is intact" in lines[0]
    assert digest(out / "last.pth") == before
    logs = ("events.out.tfevents", train.STEPS_LOG)  # TensorBoard's log, the logged steps of the epoch trained
    written = sorted(n for n in os.listdir(out) if not n.startswith(logs))
    assert written == ["best.pth", "config.yaml", "last.pth"]  # no partial file left


# ---------------------------------------------------------------------------------------------------
# 5. distributed faults (two CPU processes, gloo)

def wait_for_line(proc, text, lines, timeout=120):
    """Read proc's stdout until a line holds text (lines collects them)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            return
    raise AssertionError("".join(lines))


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_named_and_the_other_exits(synthetic_root, tmp_path):
    args = [sys.executable, "train.py", *tiny_flags(synthetic_root, tmp_path / "out", "--SOLVER.MAX_EPOCHS", "50",
                                                     "--SOLVER.IMS_PER_BATCH", "1", "--SOLVER.LOG_PERIOD", "1")]
    port = free_port()
    rank0 = subprocess.Popen(args, cwd=ROOT, env=rank_env(0, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    rank1 = subprocess.Popen(args, cwd=ROOT, env=rank_env(1, 2, port), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lines = []
    wait_for_line(rank0, "steps per epoch", lines)
    time.sleep(3)  # a few steps into epoch 1
    rank1.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = rank0.communicate(timeout=60)
    assert time.monotonic() - killed < 60
    rank1.wait()
    assert rank0.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1 and "rank 0: rank 1 stopped responding" in lines[0]
    out = tmp_path / "out"
    hint = f"continue from {out}/last.pth with:" if (out / "last.pth").exists() else "no last.pth was saved yet"
    assert hint in lines[0]  # the hint says the truth about what there is to resume from


def run_two_ranks(args):
    """Run both ranks of a two-process job without a launcher; (rank 0's stdout, stderr) after both succeeded."""
    results = run_ranks(args, 2)
    assert [code for code, _, _ in results] == [0, 0], results
    return results[0][1:]


TWO_RANKS = ["--SOLVER.MAX_EPOCHS", "2", "--SOLVER.IMS_PER_BATCH", "2"]  # two_rank_run's weights: P=2 per rank


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_once_and_resume_continues_exactly(synthetic_root, two_rank_run, tmp_path):
    stopped = tmp_path / "stopped"
    run_flags = [*TWO_RANKS, "--SOLVER.LOG_PERIOD", "1", "--SOLVER.EVAL_PERIOD", "2"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={free_port()}", "train.py",
                                 *tiny_flags(synthetic_root, stopped, *run_flags)],
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    lines = []
    wait_for_line(launcher, "steps per epoch", lines)  # printed just before the first step
    time.sleep(0.5)  # well inside the 12 steps of the two epochs, however fast the machine
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert err.count("SIGTERM: finishing this step") == 2, err  # each rank got it once, from the launcher
    assert (out + "".join(lines)).count("stopped at ") == 1 and 'train.py", line' not in err  # no worker traceback
    saved = torch.load(stopped / "last.pth", map_location="cpu", weights_only=True)
    assert saved["next_epoch"] * 100 + saved["next_step"] > 0 and len(saved["rng"]) == 2
    assert not [name for name in os.listdir(stopped) if ".tmp" in name]
    args = [sys.executable, "train.py", *tiny_flags(synthetic_root, stopped, *run_flags, "--resume", "auto")]
    assert "resumed from" in run_two_ranks(args)[0]
    assert_same_weights(weights(stopped / "last.pth"), weights(two_rank_run / "last.pth"))


@pytest.mark.slow
def test_a_bad_gallery_image_on_one_rank_stops_both_and_the_resumed_run_equals_an_uninterrupted_one(
        synthetic_root, two_rank_run, tmp_path):
    root = copy_of(synthetic_root, tmp_path)
    path = split_paths(root, "gallery")[-2]  # in rank 1's shard: rank 0 must still say which file
    good = break_image(path, "truncate")
    stopped = tmp_path / "stopped"
    run_flags = [*TWO_RANKS, "--DATALOADER.CHECK_IMAGES", "false"]
    results = run_ranks([sys.executable, "train.py", *tiny_flags(root, stopped, *run_flags)], 2)
    assert [code for code, _, _ in results] == [2, 2], results
    lines = error_lines(results[0][2])
    assert len(lines) == 1 and path in lines[0] and "the evaluation after epoch 1" in lines[0], results[0][2]
    assert "--resume auto" in lines[0] and error_lines(results[1][2]) == []  # said once, by rank 0
    saved = torch.load(stopped / "last.pth", map_location="cpu", weights_only=True)
    assert saved["next_epoch"] == 0 and saved["next_step"] > 0 and "epoch_stats" in saved
    with open(path, "wb") as f:
        f.write(good)
    args = [sys.executable, "train.py", *tiny_flags(root, stopped, *run_flags, "--resume", "auto")]
    assert "resumed from" in run_two_ranks(args)[0]
    assert_same_weights(weights(stopped / "last.pth"), weights(two_rank_run / "last.pth"))
    assert [r["mAP"] for r in read_metrics(stopped)] == [r["mAP"] for r in read_metrics(two_rank_run)]


@pytest.mark.slow
def test_skip_bad_with_two_ranks_leaves_out_a_query_image_one_rank_met(synthetic_root, tmp_path):
    root = copy_of(synthetic_root, tmp_path)
    path = split_paths(root, "query")[-1]  # in rank 1's shard
    break_image(path, "text")
    out = tmp_path / "out"
    run_flags = ["--SOLVER.MAX_EPOCHS", "1", "--SOLVER.IMS_PER_BATCH", "2", "--DATALOADER.CHECK_IMAGES", "false",
                 "--DATALOADER.SKIP_BAD", "true"]
    stdout, stderr = run_two_ranks([sys.executable, "train.py", *tiny_flags(root, out, *run_flags)])
    assert error_lines(stderr) == []
    with open(out / "skipped.txt") as f:
        assert [line.split("\t")[0] for line in f] == [path]
    assert read_metrics(out)[0]["skipped_images"] == 1
    per_image = [line for line in stdout.splitlines() if line.startswith("per image")][-1]
    assert per_image.split()[-1] == str(len(split_paths(root, "query")) - 1)


def test_the_heartbeat_names_a_silent_rank_and_ends_the_process(monkeypatch, capsys):
    # rank 0 of three: rank 1 beats once and falls silent (hung, or blocked as under NCCL), rank 2 exits in order
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv(utils.PEER_TIMEOUT_ENV, "0.5")
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), utils.HEARTBEAT["stop"].set()))
    store.add(utils._beat_key(1), 1)
    store.set(utils._done_key(2), "1")
    try:
        utils.start_heartbeat(0, 3, period_s=0.05)
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [1]
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "rank 0: rank 1 stopped responding (no heartbeat for 0.5 s" in lines[0]
        utils.HEARTBEAT["stop"].clear()  # after a failed collective: who died, who left
        assert utils.dead_ranks(wait_s=0.2) == ([1], [2])
    finally:
        utils.HEARTBEAT["stop"].set()
        utils.HEARTBEAT.update(store=None, reporting=False)


def test_a_signal_delivered_twice_at_once_counts_once(monkeypatch, capsys):
    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: kills.append(signum))
    handler = signal.getsignal(signal.SIGTERM)
    faults.request_stop(signal.SIGTERM, None)
    faults.request_stop(signal.SIGTERM, None)  # Ctrl-C under torchrun: from the terminal and from the launcher
    assert kills == [] and faults.STOP_SIGNAL["signum"] == signal.SIGTERM
    faults.STOP_SIGNAL["time"] -= 2 * faults.SIGNAL_REPEAT_S
    faults.request_stop(signal.SIGTERM, None)  # a second request, later: quit at once
    assert kills == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err.count("finishing this step") == 1


# ---------------------------------------------------------------------------------------------------
# 6. a malformed number on the command line

def test_a_malformed_number_is_one_line_without_a_misleading_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--SOLVER.BASE_LR", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "SOLVER.BASE_LR 'abc': expected a number (default: 0.00035)" in err
    assert "did you mean" not in err and "lists every key" not in err
