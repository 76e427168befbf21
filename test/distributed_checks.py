"""One rank of test_distributed.py's step checks, run as a process of a real gloo group (RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment):

    python test/distributed_checks.py OUT_DIR CHECK [CHECK ...]

Each check writes OUT_DIR/<check>_rank<r>.pt for the test to compare with one process on the whole batch."""
import os
import sys

import torch
from step_setup import SIZE, DirectCall, K, P, batches, compare_steps, flat_state, make_state, step_config

import train
from model import SyncedBatchNorm, masked_batch_norm
from support import utils


def shard(tensor, rank, world_size):
    """This rank's contiguous rows of a batch every rank built alike."""
    rows = len(tensor) // world_size
    return tensor[rank * rows:(rank + 1) * rows]


def global_batch(world_size, masked):
    """The same identity-major batch of world_size x P identities on every rank: (images, pids, is_real)."""
    return next(batches(1, masked=masked, num_ids=world_size * P, seed=5))


def running_statistics(model):
    """{buffer name: tensor} of every BatchNorm's running mean and variance."""
    return {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}


def sync_bn(rank, world_size):
    """One training step per mask setting under SOLVER.SYNC_BN on this rank's shard: the running statistics; and
    SyncedBatchNorm's output and gradients on a 4-d and (masked) a 2-d input."""
    result = {}
    for masked in (False, True):
        cfg = step_config("Adam", masked, "--SOLVER.SYNC_BN", "true")
        state = make_state(cfg)
        train.wrap_for_training(state, cfg, torch.device("cpu"), world_size)
        images, pids, is_real = (shard(t, rank, world_size) for t in global_batch(world_size, masked))
        train.train_step(state, images, pids, is_real if masked else None)
        result["masked" if masked else "plain"] = running_statistics(state.model)
    for name, shape, masked in (("4d", (8, 5, 3, 2), False), ("2d_masked", (8, 5), True)):
        g = torch.Generator().manual_seed(7)
        x = shard(torch.randn(world_size * shape[0], *shape[1:], generator=g), rank, world_size).requires_grad_()
        weights = shard(torch.randn(world_size * shape[0], *shape[1:], generator=g), rank, world_size)
        mask = shard(torch.arange(world_size * shape[0]) % 3 != 0, rank, world_size) if masked else None
        bn = SyncedBatchNorm(shape[1]).train()
        out = masked_batch_norm(bn, x, mask) if masked else bn(x)
        (out * weights).sum().backward()
        result[name] = {"out": out.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad,
                        "bias_grad": bn.bias.grad, "running_var": bn.running_var}
    return result


def graph_ddp(rank, world_size):
    """Three steps under DDP, eager (train.train_step) and through a GraphedStep whose record is a direct call (its
    gradients averaged by its own all-reduce between the body's halves), compared one step at a time. The
    BatchNorm running statistics are compared on rank 0 only: DDP's forward gives every rank rank 0's, the graph
    leaves each its own; neither trains with them, and checkpoints and evaluations take rank 0's."""
    cfg = step_config("Adam")
    eager, graph = make_state(cfg), make_state(cfg)
    for state in (eager, graph):
        train.wrap_for_training(state, cfg, torch.device("cpu"), world_size)
    graphed = train.graphed_step(graph, (P * K, 3, *SIZE), warmup_steps=1, record=DirectCall)
    steps = compare_steps(eager, graph, graphed, list(batches(3, seed=10 + rank)), lr_steps=(2,),
                          statistics=rank == 0)
    return {"steps": steps, "state": flat_state(graph, statistics=False),
            "replays": [g.replays for g in graphed.graphs]}


def decisions(rank, world_size):
    """What each rank gets from a decision rank 0 makes (each rank's own answer differs), and from work that fails
    on rank 1 only: [value or the error's message]."""
    outcomes = [utils.decided_by_rank0(lambda: f"rank {rank}'s answer", rank)]
    for work in (lambda: f"rank {rank}'s value", lambda: _fail_on_rank_1(rank)):
        try:
            outcomes.append(utils.on_every_rank(work))
        except utils.UserError as err:
            outcomes.append(f"error: {err}")
    return outcomes


def _fail_on_rank_1(rank):
    if rank == 1:
        raise utils.UserError("rank 1 cannot read the checkpoint")
    return "read"


CHECKS = {"sync_bn": sync_bn, "graph_ddp": graph_ddp, "decisions": decisions}


def main(out_dir, checks):
    """Join the group, run the checks, write each one's result."""
    _, rank, world_size, _ = utils.init_distributed("cpu")
    for name in checks:
        torch.save(CHECKS[name](rank, world_size), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
