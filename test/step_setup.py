"""Training states for step tests, built with train.py's own functions: a CTL model (resnet18's head on a tiny
backbone) at 32x16, its center loss, optimizers and schedule, and identity-major P x K batches (with mock images
when masked)."""
import copy

import torch

import train
from loss import CenterLoss
from model import build_model
from support import utils

P, K, NUM_CLASSES, SIZE = 3, 3, 16, (32, 16)


def step_config(optimizer="Adam", masked=False, *more):
    """train.py's configuration for these states: warm-up over 3 epochs (the lr changes at every scheduler step)."""
    cfg, _, _ = train.parse_args(["--SOLVER.OPTIMIZER_NAME", optimizer, "--SOLVER.BASE_LR", "1e-3",
                                  "--SOLVER.IMS_PER_BATCH", str(P), "--DATALOADER.NUM_INSTANCE", str(K),
                                  "--SOLVER.WARMUP_EPOCHS", "3", "--DATALOADER.USE_RESAMPLING", str(not masked),
                                  *more])
    return cfg


def make_state(cfg, device="cpu", amp_dtype=None, seed=0, tiny=True):
    """A train.TrainState as train.build_state makes it (without a loader), identical for equal seeds. tiny: a
    conv, BatchNorm and ReLU stand in for resnet18's backbone (its 512 channels): the step's mechanics are the
    same, at a fraction of the cost (CPU bf16 convolutions are slow)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model("resnet18", NUM_CLASSES)
    if tiny:
        model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, model.feat_dim, 3, stride=4, padding=1),
                                             torch.nn.BatchNorm2d(model.feat_dim), torch.nn.ReLU())
    model = model.to(device, memory_format=utils.memory_format(device)).train()
    center_loss = CenterLoss(NUM_CLASSES, model.feat_dim).to(device)
    optimizer, center_optimizer, scheduler = train.build_optimizers(cfg, model, center_loss)
    return train.TrainState(model, center_loss, optimizer, center_optimizer, scheduler,
                            utils.make_grad_scaler(device, False), None, amp_dtype=amp_dtype,
                            losses=train.loss_spec(cfg),
                            masked=not cfg.DATALOADER.USE_RESAMPLING)


def batches(num, device="cpu", seed=1, masked=False, num_ids=P):
    """num random identity-major batches (images, pids, is_real) as the PK sampler yields them; masked: the last
    image of the first identity is a mock (all zero, is_real False)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(num):
        pids = torch.randperm(NUM_CLASSES, generator=g)[:num_ids].repeat_interleave(K)
        images = torch.randn(num_ids * K, 3, *SIZE, generator=g)
        is_real = torch.ones(num_ids * K, dtype=torch.bool)
        if masked:
            is_real[K - 1] = False
            images[K - 1] = 0
        yield (images.to(device, memory_format=utils.memory_format(torch.device(device))), pids.to(device),
               is_real.to(device))


def flat_state(state, statistics=True):
    """Every parameter, center and (with statistics) BatchNorm statistic as one float64 vector."""
    tensors = [*state.model.parameters(), *state.center_loss.parameters()]
    tensors += [b for name, b in state.model.named_buffers() if "running" in name] if statistics else []
    return torch.cat([t.detach().double().flatten() for t in tensors])


def load_state(target, source):
    """Give target the source's weights, statistics, centers and optimizer state (copies, not shared tensors)."""
    target.model.load_state_dict(source.model.state_dict())
    target.center_loss.load_state_dict(source.center_loss.state_dict())
    for mine, theirs in zip(target.optimizers, source.optimizers):
        mine.load_state_dict(copy.deepcopy(theirs.state_dict()))


def relative_update_error(before, graph_after, eager_after):
    """|graph update - eager update| / |eager update| of two flat states that started at before."""
    return ((graph_after - eager_after).norm() / (eager_after - before).norm()).item()


class DirectCall:
    """cuda_graph.record's stand-in off CUDA: each replay calls the recorded function again, as a graph's replay
    runs the recorded kernels again."""

    def __init__(self, fn, pool=None):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()

    def pool(self):
        return None


def compare_steps(eager, graph, graphed, data, lr_steps=(), masked=False, statistics=True):
    """Train eager (train.train_step) and graph (through graphed, a GraphedStep of it) on the same batches of data,
    the schedules stepped before each step in lr_steps. Each step starts both from the graphed state: Adam and
    batch-hard mining turn rounding differences (the graph's Adam reads its lr from a float32 tensor) into other
    training within a few steps, so the steps are compared one at a time. statistics: compare the BatchNorm
    running statistics too. -> [(eager loss row, graphed loss row, relative error of the graphed update)]."""
    steps = []
    for step, (images, pids, is_real) in enumerate(data):
        if step in lr_steps:
            eager.scheduler.step()
            graph.scheduler.step()
        is_real = is_real if masked else None
        before = flat_state(graph, statistics)
        rows = train.train_step(eager, images, pids, is_real), graphed.step(images, pids, is_real)
        steps.append((*rows, relative_update_error(before, flat_state(graph, statistics),
                                                   flat_state(eager, statistics))))
        load_state(eager, graph)
    return steps
