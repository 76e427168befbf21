"""Several devices you can trust, shown with real gloo process groups on the CPU: synchronised BatchNorm statistics
(2 and 4 ranks), the graphed step body under DDP, each rank's own augmentation draws, a stop for a bad file (CPU
loader with 0 and 2 workers, device decoding) that every rank makes at the same step and that resumes exactly,
DROP_LAST False, two nodes through torchrun's c10d rendezvous, and a rank killed under torchrun --max-restarts."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from run_outputs import (
    ROOT,
    assert_all_succeeded,
    assert_same_weights,
    free_port,
    last_metrics,
    run_ranks,
    tiny_flags,
    weights,
)
from step_setup import P, batches, make_state, step_config

import data
from model import masked_batch_norm
from support import device_data
from support.sampler import PKSampler
from support.specs import AugmentSpec, BatchSpec, LoaderSpec

# ---------------------------------------------------------------------------------------------------
# 1. The step: synchronised BatchNorm, the graphed body under DDP (test/distributed_checks.py in each rank)

@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def step_checks(request, tmp_path_factory):
    """The checks of distributed_checks.py run by 2 (sync_bn, graph_ddp, decisions) or 4 (sync_bn) ranks: their
    results."""
    world_size, out = request.param, tmp_path_factory.mktemp(f"checks{request.param}")
    checks = ["sync_bn", "graph_ddp", "decisions"] if world_size == 2 else ["sync_bn"]
    assert_all_succeeded(run_ranks([sys.executable, "test/distributed_checks.py", str(out), *checks], world_size))
    return world_size, {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(world_size)]
                        for name in checks}


def one_process_statistics(world_size, masked):
    """The running statistics of one process that trains on every rank's batch at once, without SYNC_BN."""
    state = make_state(step_config("Adam", masked))
    images, _, is_real = next(batches(1, masked=masked, num_ids=world_size * P, seed=5))
    state.model.train()(images, is_real if masked else None)
    return {name: b for name, b in state.model.named_buffers() if "running" in name}


@pytest.mark.parametrize("masked", [False, True], ids=["all real", "with mock images"])
def test_sync_bn_statistics_are_every_ranks_and_equal_one_process_on_the_whole_batch(step_checks, masked):
    world_size, results = step_checks
    expected = one_process_statistics(world_size, masked)
    assert "bn.running_mean" in expected and "backbone.1.running_var" in expected  # the BNNeck and the backbone's
    for rank, result in enumerate(results["sync_bn"]):
        got = result["masked" if masked else "plain"]
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {name}")
    local = results["sync_bn"][0]["plain"]["bn.running_mean"] - results["sync_bn"][1]["plain"]["bn.running_mean"]
    assert local.abs().max() == 0  # equal on every rank, not only close


@pytest.mark.parametrize("name", ["4d", "2d_masked"])
def test_synced_batch_norm_outputs_and_gradients_equal_batch_norm_on_the_whole_batch(step_checks, name):
    world_size, results = step_checks
    parts = [result[name] for result in results["sync_bn"]]
    shape = (8, 5, 3, 2) if name == "4d" else (8, 5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world_size * shape[0], *shape[1:], generator=g).requires_grad_()
    weights = torch.randn(world_size * shape[0], *shape[1:], generator=g)
    bn = torch.nn.BatchNorm2d(5) if name == "4d" else torch.nn.BatchNorm1d(5)
    if name == "4d":
        out = bn.train()(x)
    else:
        out = masked_batch_norm(bn.train(), x, torch.arange(world_size * shape[0]) % 3 != 0)
    (out * weights).sum().backward()
    close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)  # noqa: E731
    close(torch.cat([p["out"] for p in parts]), out.detach(), "outputs")
    close(torch.cat([p["x_grad"] for p in parts]), x.grad, "input gradients (through the all-reduce)")
    close(sum(p["weight_grad"] for p in parts), bn.weight.grad, "weight gradient (summed over ranks)")
    close(sum(p["bias_grad"] for p in parts), bn.bias.grad, "bias gradient")
    close(parts[0]["running_var"], bn.running_var, "running variance (unbiased over every rank's rows)")


@pytest.mark.parametrize("step_checks", [2], indirect=True, ids=["2 ranks"])
def test_graphed_step_body_under_ddp_trains_like_the_eager_ddp_step(step_checks):
    _, results = step_checks
    for rank, result in enumerate(results["graph_ddp"]):
        assert result["replays"] == [2, 2]  # two halves replayed, the gradients all-reduced between them
        for step, (eager_row, graph_row, error) in enumerate(result["steps"]):
            torch.testing.assert_close(graph_row, eager_row, rtol=1e-6, atol=1e-8, msg=f"rank {rank}, step {step}")
            assert error < 1e-6, f"rank {rank}, step {step}: the graphed update is {error:.2e} off the eager one"
    assert torch.equal(results["graph_ddp"][0]["state"], results["graph_ddp"][1]["state"])  # averaged, not local


@pytest.mark.parametrize("step_checks", [2], indirect=True, ids=["2 ranks"])
def test_rank_0_decides_for_every_rank_and_an_error_on_one_rank_stops_them_all(step_checks):
    _, results = step_checks
    rank0, rank1 = results["decisions"]
    assert rank0[0] == rank1[0] == "rank 0's answer"  # --resume auto: one answer, whatever rank 1's folder says
    assert (rank0[1], rank1[1]) == ("rank 0's value", "rank 1's value")  # work done on each rank, kept there
    assert rank0[2] == rank1[2] == "error: rank 1 cannot read the checkpoint"  # every rank stops with rank 1's error


# ---------------------------------------------------------------------------------------------------
# 2. Each rank's augmentation draws

def same_picture_items(root, count):
    """count train items that all show the same picture, 2 per identity: batches differ only by augmentation."""
    path = data.build_datasets("synthetic", root)["train"][0][0]
    return [(path, i // 2, 0) for i in range(count)]


@pytest.mark.parametrize("device_augment", [False, True], ids=["cpu loader", "device augmentation"])
def test_ranks_draw_their_own_augmentation_whatever_the_global_seed_and_the_workers(synthetic_root, device_augment):
    items = same_picture_items(synthetic_root, 16)

    def first_batch(rank, workers):
        torch.manual_seed(0)  # each rank's process starts from the same global state
        spec = LoaderSpec(BatchSpec(2, 2), AugmentSpec((64, 32)), workers)
        if device_augment:
            loader = device_data.DeviceAugmentLoader(items, spec, "cpu", rank=rank, world_size=2)
        else:
            loader = data.build_train_loader(items, spec, rank=rank, world_size=2)[0]
        return next(iter(loader))[0]

    rank0, rank1 = first_batch(0, 0), first_batch(1, 0)
    assert not torch.equal(rank0, rank1)
    different = (rank0 - rank1).flatten(1).abs().amax(dim=1) > 0
    assert different.float().mean() > 0.5  # most images drew another flip, crop or erasing box
    if not device_augment:  # the draws are the position's, not a worker's: 2 workers give the same batch
        assert torch.equal(first_batch(0, 2), rank0)


# ---------------------------------------------------------------------------------------------------
# 3. Whole runs of train.py

def run_flags(root, output_dir, *more):
    """A few-second run for 2 ranks: resnet18 at 64x32, P=2 x K=2 per rank (3 steps an epoch here), 2 epochs,
    evaluated after the last: the conftest's two_rank_run, logged at every step."""
    return ["train.py", *tiny_flags(root, output_dir, "--SOLVER.IMS_PER_BATCH", "2", "--SOLVER.MAX_EPOCHS", "2",
                                    "--SOLVER.EVAL_PERIOD", "2", "--SOLVER.LOG_PERIOD", "1", *more)]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, two_rank_run, tmp_path_factory):
    """Uninterrupted 2-rank runs, with the CPU loader (the session's) and with device augmentation: what the others
    must equal."""
    out = tmp_path_factory.mktemp("uninterrupted_device")
    args = [sys.executable, *run_flags(synthetic_root, out, "--INPUT.DEVICE_AUGMENT", "true")]
    assert_all_succeeded(run_ranks(args, 2))
    return {"cpu": two_rank_run, "device": out}


def train_path_at(root, rank, step):
    """A train image that rank `rank` first needs at step `step` of epoch 1 (as run_flags trains with 2 ranks)."""
    items = data.build_datasets("synthetic", root)["train"]
    sampler = PKSampler([pid for _, pid, _ in items], BatchSpec(2, 2), rank, 2)
    sampler.set_epoch(0)
    batches_of_rank = sampler.epoch_batches()
    earlier = {i for batch in batches_of_rank[:step] for i in batch}
    return next(items[i][0] for i in batches_of_rank[step] if i not in earlier and i < len(items))


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["cpu, 0 workers", "cpu, 2 workers", "device"])
def test_a_bad_file_on_one_rank_stops_both_at_its_step_and_the_resumed_run_equals_an_uninterrupted_one(
        synthetic_root, uninterrupted, tmp_path, loader):
    root = str(tmp_path / "data")
    shutil.copytree(synthetic_root, root)
    path = train_path_at(root, 1, 2)  # rank 1's, mid-epoch 1
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(b"not an image\n")  # PIL and nvJPEG alike refuse it
    more = {"cpu, 0 workers": (), "cpu, 2 workers": ("--DATALOADER.NUM_WORKERS", "2"),
            "device": ("--INPUT.DEVICE_AUGMENT", "true")}[loader]
    out = tmp_path / "out"
    args = [sys.executable, *run_flags(root, out, *more, "--DATALOADER.CHECK_IMAGES", "false")]
    start = time.monotonic()
    results = run_ranks(args, 2)
    assert time.monotonic() - start < 60  # not a hang until the collective timeout
    assert [code for code, _, _ in results] == [2, 2], results
    errors = [[line for line in err.splitlines() if "error:" in line] for _, _, err in results]
    assert len(errors[0]) == 1 and errors[1] == [] and "Traceback" not in results[0][2] + results[1][2]
    line = errors[0][0]
    assert path in line and "stopped at epoch 1, step 2" in line and "--resume auto" in line, line
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert (saved["next_epoch"], saved["next_step"]) == (0, 2)
    with open(path, "wb") as f:
        f.write(good)
    assert_all_succeeded(run_ranks(args[:-2] + ["--resume", "auto"], 2))
    reference = uninterrupted["device" if loader == "device" else "cpu"]
    assert_same_weights(weights(out / "last.pth"), weights(reference / "last.pth"))
    assert last_metrics(out) == last_metrics(reference)


@pytest.mark.slow
def test_drop_last_false_trains_its_smaller_last_step_on_two_ranks_and_evaluates(synthetic_root, tmp_path):
    out = assert_all_succeeded(run_ranks([sys.executable, *run_flags(
        synthetic_root, tmp_path, "--DATALOADER.DROP_LAST", "false", "--SOLVER.IMS_PER_BATCH", "3")], 2))
    pids = [pid for _, pid, _ in data.build_datasets("synthetic", synthetic_root)["train"]]
    steps = [len(PKSampler(pids, BatchSpec(3, 2, drop_last=drop), 0, 2)) for drop in (True, False)]
    assert steps[1] == steps[0] + 1 and f"{steps[1]} steps per epoch" in out  # the smaller last step is trained
    one_device = len(PKSampler(pids, BatchSpec(3, 2, drop_last=False)))
    assert f"schedule: 2 devices make {steps[1]} updates per epoch, {2 * steps[1]} in 2 epochs; one device with the " \
           f"same P makes {one_device} per epoch" in out
    metrics = last_metrics(tmp_path)
    assert metrics["epoch"] == 2 and 0 < metrics["centroid_mAP"] <= 1


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.mark.slow
def test_two_nodes_through_c10d_give_the_metrics_of_four_processes_on_one_node(synthetic_root, tmp_path):
    flags = ["--SOLVER.MAX_EPOCHS", "1", "--SOLVER.EVAL_PERIOD", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(torchrun("--nproc_per_node=4", f"--master_port={free_port()}",
                                  *run_flags(synthetic_root, tmp_path / "one", *flags)),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(torchrun("--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
                                       f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes", f"--node-rank={node}",
                                       *run_flags(synthetic_root, tmp_path / "two", *flags)),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert "4 device(s)" in "".join(out for out, _ in outputs)
    assert last_metrics(tmp_path / "two") == last_metrics(tmp_path / "one")
    assert_same_weights(weights(tmp_path / "two" / "last.pth"), weights(tmp_path / "one" / "last.pth"))


def worker_of_rank(launcher_pid, rank):
    """The pid of the launcher's worker process whose RANK is rank, or None while there is none."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_rank_killed_under_max_restarts_resumes_by_itself_and_ends_as_an_uninterrupted_run(
        synthetic_root, uninterrupted, tmp_path):
    out = tmp_path / "out"
    launcher = subprocess.Popen(torchrun("--nproc_per_node=2", "--max-restarts=1", f"--master_port={free_port()}",
                                         *run_flags(synthetic_root, out)),
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:  # the end of epoch 1 (its last.pth saved next), then well inside epoch 2
        lines.append(line)
        if line.startswith("epoch 1/2"):
            break
    time.sleep(1.0)
    victim = worker_of_rank(launcher.pid, 1)
    assert victim is not None, "".join(lines)
    os.kill(victim, signal.SIGKILL)
    rest, _ = launcher.communicate(timeout=300)
    output = "".join(lines) + rest
    assert launcher.returncode == 0, output[-4000:]
    assert "restart 1 of this job (torchrun --max-restarts): resuming" in output
    assert "resumed from" in output and "torchrun restarts the group, which" in output
    assert_same_weights(weights(out / "last.pth"), weights(uninterrupted["cpu"] / "last.pth"))
    assert last_metrics(out) == last_metrics(uninterrupted["cpu"])
