"""Train a centroid-triplet ReID model: one entrypoint for one device, torch.distributed.launch and torchrun.

    python train.py --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data --OUTPUT_DIR output
    python train.py --config_file configs/market1501_256_resnet50.yml DATASETS.ROOT_DIR /data
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...
    torchrun --nproc_per_node=8 train.py ...

Read it top to bottom: what a run holds and how it is built, the training step, an epoch, the evaluation and the
checkpoint save at an epoch's end, the run (builders, then the epoch loop), main. What a long run survives (stop
signals, unreadable files, a full disk, a dead rank) is support/faults.py's, called at named points; the checkpoint
format is support/checkpoint.py's.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import visualize
from data import build_datasets, build_train_loader
from evaluate import evaluate_checkpoint, evaluate_splits, format_results
from loss import CenterLoss, LossSpec, build_center_optimizer, compute_losses, scale_center_grads
from model import build_model, has_sync_bn, load_weights, stem_relu_message, synchronise_batch_norms
from support import checkpoint, config, faults, utils
from support.cuda_graph import WARMUP_STEPS, GraphedStep, StepHalves, graph_supported
from support.device_data import DeviceAugmentLoader
from support.image_check import UnreadableImages
from support.report import write_config_report
from support.sampler import PKSampler
from support.specs import loader_spec

OPTIONS = [  # what is not a configuration key (config.parse adds --config_file)
    ("resume", ("--resume",), "", "auto (OUTPUT_DIR/last.pth if present), best (OUTPUT_DIR/best.pth) or a "
     "checkpoint path"),
    ("plot", ("--plot",), "", "redraw OUTPUT_DIR/curves.png from OUTPUT_DIR/metrics.jsonl and exit"),
    ("local_rank", ("--local_rank", "--local-rank"), None, "set by torch.distributed.launch"),
]
LOSS_TERMS = ("centroid_triplet", "triplet", "xent", "center")


def parse_args(argv=None):
    """(Config, options, given keys) from the command line; exits 2 with a clear message on a bad key or value."""
    return config.parse_args(argv, OPTIONS, prog="train.py")


# ---------------------------------------------------------------------------------------------------
# What a run holds, and building it

@dataclasses.dataclass
class TrainState:
    """One run's moving parts: the model (and the copies wrapped for training), optimizers, schedule, sampler."""
    model: torch.nn.Module
    center_loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    center_optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    sampler: object
    train_model: torch.nn.Module = None  # DDP wrappers of model and center_loss when used
    train_center_loss: torch.nn.Module = None
    amp_dtype: torch.dtype = None
    apex_amp: object = None
    graphed: object = None  # cuda_graph.GraphedStep when the step runs as one CUDA graph
    writer: object = None  # TensorBoard SummaryWriter on rank 0 when tensorboard is installed
    next_epoch: int = 0
    next_step: int = 0
    best_metric: float = None
    losses: LossSpec = LossSpec()  # how compute_losses computes and weighs the four losses (loss_spec)
    masked: bool = False  # batches can hold mock images (USE_RESAMPLING False): the step passes is_real

    def __post_init__(self):
        self.train_model = self.train_model or self.model
        self.train_center_loss = self.train_center_loss or self.center_loss

    @property
    def optimizers(self):
        return [self.optimizer, self.center_optimizer]


def lr_factor(epoch, cfg):
    """The lr of an epoch as a fraction of BASE_LR, as the original sets it.

    The original overwrites the lr with (epoch+1)/WARMUP_EPOCHS x BASE_LR at every warm-up step and steps
    its scheduler once per epoch on whatever lr the optimizer holds. So a multistep milestone inside the
    warm-up is overwritten, and cosine annealing continues from BASE_LR at the last warm-up epoch.
    """
    solver = cfg.SOLVER
    warmup = solver.WARMUP_EPOCHS if solver.USE_WARMUP_LR else 0
    if epoch < warmup:
        return min(1.0, (epoch + 1) / warmup)
    if solver.LR_SCHEDULER_NAME == "multistep_lr":
        return solver.GAMMA ** sum(warmup <= step <= epoch for step in solver.LR_STEPS)
    floor = solver.MIN_LR / solver.BASE_LR
    cosine = lambda e: 1 + math.cos(math.pi * e / solver.MAX_EPOCHS)  # noqa: E731
    return floor + (1 - floor) * cosine(epoch) / (cosine(warmup - 1) if warmup else 2)


def build_optimizers(cfg, model, center_loss):
    """The model's optimizer, the center loss's SGD, and the per-epoch lr schedule. Every trainable parameter decays
    at SOLVER.WEIGHT_DECAY, biases included: the original's one group (its SOLVER.WEIGHT_DECAY_BIAS is never read;
    config.IGNORED says so when it is set)."""
    solver = cfg.SOLVER
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": solver.WEIGHT_DECAY}]
    if solver.OPTIMIZER_NAME == "Adam":
        optimizer = torch.optim.Adam(groups, lr=solver.BASE_LR)
    elif solver.OPTIMIZER_NAME == "AdamW":
        optimizer = torch.optim.AdamW(groups, lr=solver.BASE_LR)
    else:
        optimizer = torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM)
    center_optimizer = build_center_optimizer(center_loss, lr=solver.CENTER_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg))
    return optimizer, center_optimizer, scheduler


def loss_spec(cfg):
    """The losses as the configuration asks for them (the layout check is off: the PK sampler guarantees it)."""
    solver = cfg.SOLVER
    return LossSpec(cfg.DATALOADER.NUM_INSTANCE, solver.MARGIN, solver.DISTANCE_FUNC, solver.LABEL_SMOOTH,
                    solver.CENTROID_CONTRASTIVE_WEIGHT, solver.QUERY_CONTRASTIVE_WEIGHT, solver.QUERY_XENT_WEIGHT,
                    solver.CENTER_LOSS_WEIGHT, check_layout=False)


def build_network(cfg, num_classes, device):
    """(model, center loss) on the device, from ImageNet weights or MODEL.PRETRAIN_PATH."""
    pretrain_path = "" if cfg.MODEL.RESUME_TRAINING else cfg.MODEL.PRETRAIN_PATH
    imagenet = cfg.MODEL.PRETRAINED and not pretrain_path
    model = build_model(cfg.MODEL.NAME, num_classes, cfg.MODEL.LAST_STRIDE, pretrained=imagenet,
                        stem_relu={"auto": None, "true": True, "false": False}[cfg.MODEL.STEM_RELU])
    note = stem_relu_message(model, imagenet)
    if note and utils.is_main_process():
        print(note)
    emb_size = cfg.MODEL.BACKBONE_EMB_SIZE
    if emb_size and emb_size != model.feat_dim:
        raise utils.UserError(f"MODEL.BACKBONE_EMB_SIZE {emb_size}: {cfg.MODEL.NAME} gives {model.feat_dim}-d "
                              "features (set it to that, or 0 to follow the backbone)")
    center_loss = CenterLoss(num_classes, model.feat_dim)
    if pretrain_path:  # our checkpoints and the original's also carry the center-loss centers
        load_weights(model, pretrain_path, center_loss=center_loss)
    model.to(device, memory_format=utils.memory_format(device))
    return model, center_loss.to(device)


def build_loader(cfg, data, device, rank, world_size):
    """(train loader, its PK sampler) on the CPU workers, or decoding and augmenting on the device."""
    spec = loader_spec(cfg)
    if spec.device_augment:
        loader = DeviceAugmentLoader(data["train"], spec, device, rank, world_size, with_is_real=True)
        return loader, loader.batch_sampler
    return build_train_loader(data["train"], spec, rank, world_size, with_is_real=True)


def build_state(cfg, data, device, rank, world_size):
    """Loader, model, losses, optimizers, schedule and precision of a run, ready to train."""
    loader, sampler = build_loader(cfg, data, device, rank, world_size)
    model, center_loss = build_network(cfg, data["num_train_pids"], device)
    optimizer, center_optimizer, scheduler = build_optimizers(cfg, model, center_loss)
    amp_dtype, needs_scaler = utils.amp_settings(device.type, cfg.USE_MIXED_PRECISION, cfg.SOLVER.AMP_DTYPE)
    state = TrainState(model, center_loss, optimizer, center_optimizer, scheduler,
                       utils.make_grad_scaler(device, needs_scaler), sampler, amp_dtype=amp_dtype,
                       losses=loss_spec(cfg), masked=not cfg.DATALOADER.USE_RESAMPLING)
    if utils.amp_backend(cfg.SOLVER.AMP_BACKEND, device, cfg.USE_MIXED_PRECISION)[0] == "apex":
        setup_apex(state, cfg, device)
    return loader, state


def setup_apex(state, cfg, device):
    """apex.amp.initialize (SOLVER.AMP_OPT_LEVEL, dynamic loss scale) when apex is installed; a clear exit when not."""
    apex_amp = utils.import_apex_amp()
    if apex_amp is None:
        raise utils.UserError("SOLVER.AMP_BACKEND apex: apex is not installed. On Ascend install Ascend's apex "
                              "fork (requirements-npu.txt); elsewhere use --SOLVER.AMP_BACKEND native (torch.amp), "
                              "which needs nothing extra, or auto.")
    state.model, (state.optimizer, state.center_optimizer) = apex_amp.initialize(
        state.model, state.optimizers, opt_level=cfg.SOLVER.AMP_OPT_LEVEL, loss_scale="dynamic")
    state.apex_amp, state.amp_dtype = apex_amp, None  # apex casts and scales itself
    state.scaler = utils.make_grad_scaler(device, False)


def wrap_for_training(state, cfg, device, world_size):
    """DDP (model and centers, whose gradients are averaged like the model's) and, with SOLVER.SYNC_BN, BatchNorm
    statistics over every rank's batch (model.SyncedBatchNorm, the BNNeck's masked statistics included)."""
    if world_size > 1:
        model = synchronise_batch_norms(state.model) if cfg.SOLVER.SYNC_BN else state.model
        device_ids = [device.index] if device.type != "cpu" else None
        state.train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        state.train_center_loss = torch.nn.parallel.DistributedDataParallel(state.center_loss, device_ids=device_ids)


def build_graphed_step(state, cfg, device):
    """state.graphed: the step body as one CUDA graph when SOLVER.CUDA_GRAPH allows it; the reason once when not."""
    if cfg.SOLVER.CUDA_GRAPH == "false":
        return
    supported, reason = graph_supported(device, state.amp_dtype, "apex" if state.apex_amp else "native",
                                        sync_bn=has_sync_bn(state.train_model))
    if not supported:
        if cfg.SOLVER.CUDA_GRAPH == "true":
            raise utils.UserError(f"SOLVER.CUDA_GRAPH true: {reason}; use SOLVER.CUDA_GRAPH auto or false")
        print(f"CUDA graph: off ({reason})")
        return
    shape = (cfg.SOLVER.IMS_PER_BATCH * state.losses.num_instances, 3, *cfg.INPUT.SIZE_TRAIN)
    state.graphed = graphed_step(state, shape)
    last = "" if cfg.DATALOADER.DROP_LAST else "; the epoch's last, smaller step (DATALOADER.DROP_LAST False) eagerly"
    print(f"CUDA graph: the training step is captured after {WARMUP_STEPS} eager steps and replayed{last}")


def graphed_step(state, batch_shape, **options):
    """A GraphedStep of this state's step body: its two halves on the model and center loss themselves (the graph
    averages the gradients over DDP's process group itself). options: GraphedStep's warmup_steps and record."""
    direct = dataclasses.replace(state, train_model=state.model, train_center_loss=state.center_loss, graphed=None)
    halves = StepHalves(functools.partial(forward_backward, direct), functools.partial(apply_update, direct))
    ddp = isinstance(state.train_model, torch.nn.parallel.DistributedDataParallel)
    return GraphedStep(halves, state.optimizers, batch_shape, next(state.model.parameters()).device,
                       masked=state.masked, process_group=state.train_model.process_group if ddp else None, **options)


# ---------------------------------------------------------------------------------------------------
# The training step: one body, run as it is or replayed as a CUDA graph

def forward_backward(state, images, pids, is_real=None):
    """The step's first half: zero the grads, forward, the four losses, backward (the loss scaled for fp16 or
    apex) -> the [5] loss row (total, then the terms). is_real only when batches can hold mock images."""
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    with utils.autocast(images.device, state.amp_dtype):
        feat, logits = state.train_model(images, is_real)  # mock images: the BNNeck's statistics skip them
    total, terms = compute_losses(feat.float(), logits.float(), pids, state.train_center_loss, state.losses, is_real)
    if state.apex_amp is not None:
        with state.apex_amp.scale_loss(total, state.optimizers) as scaled:
            scaled.backward()
    else:
        state.scaler.scale(total).backward()
    return torch.stack([total.detach().float()] + [t.float() for t in terms.values()])


def apply_update(state):
    """The step's second half: the centers' gradients rescaled (unscaled first), both optimizers stepped."""
    state.scaler.unscale_(state.center_optimizer)  # a no-op unless fp16's GradScaler scaled the loss
    scale_center_grads(state.center_loss, state.losses.center_weight)
    state.scaler.step(state.optimizer)
    state.scaler.step(state.center_optimizer)
    state.scaler.update()


def train_step(state, images, pids, is_real=None):
    """One training step -> the [5] loss row. The one body: run as it is, or recorded in a CUDA graph
    (cuda_graph.GraphedStep replays these same two halves)."""
    loss_row = forward_backward(state, images, pids, is_real)
    apply_update(state)
    return loss_row


def run_step(state, batch, device):
    """Move a loader batch to the device and train on it, graphed or eager -> (the loss row, pids on the device)."""
    images, pids, _, is_real = batch
    images = images.to(device, non_blocking=True, memory_format=utils.memory_format(device))
    pids = pids.to(device, non_blocking=True)
    is_real = is_real.to(device, non_blocking=True) if state.masked else None
    if state.graphed is not None:
        return state.graphed.step(images, pids, is_real), pids  # the same body, replayed as a CUDA graph
    return train_step(state, images, pids, is_real), pids


# ---------------------------------------------------------------------------------------------------
# An epoch

def train_one_epoch(state, loader, cfg, device, epoch, start_step, world_size):
    """Train one epoch (from start_step); returns the epoch's mean losses and speed, and where a stop signal
    stopped it (None when it ran to the end). A batch that could not be read stops every rank before that step
    (faults.BadImageStop); a NaN/inf loss ends the run (faults.RunStop)."""
    state.train_model.train()
    images_per_step = cfg.SOLVER.IMS_PER_BATCH * cfg.DATALOADER.NUM_INSTANCE * world_size
    log_period, num_steps = max(1, cfg.SOLVER.LOG_PERIOD), len(loader.batch_sampler)
    sums = torch.zeros(5, device=device)  # total, centroid_triplet, triplet, xent, center
    first_bad = torch.tensor(-1, device=device)
    bar = tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch + 1}", unit="step",
               disable=not utils.is_main_process(), dynamic_ncols=True, leave=False)
    done, data_time, stopped = 0, 0.0, False
    start = tick = time.perf_counter()
    since = (start, start_step)  # the previous logged step: (time, steps done), for steps.jsonl
    for step, batch in enumerate(loader, start=start_step):
        data_time += time.perf_counter() - tick
        stop, bad_message = faults.stop_before_step(loader.bad_message, world_size)
        if bad_message:
            bar.close()
            raise faults.BadImageStop(bad_message, step)
        if stop:
            stopped = True
            break
        loss_row, pids = run_step(state, batch, device)
        if step == start_step and world_size > 1:
            check_disjoint_identities(pids, world_size)
        sums += loss_row
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_row).all(), step, first_bad)
        done += 1
        bar.update(1)
        if (step + 1) % log_period == 0 or step + 1 == num_steps:
            bad_step = faults.first_non_finite_step(first_bad)
            if bad_step >= 0:
                raise faults.RunStop(1, f"error: {faults.non_finite_message(epoch, bad_step, state.amp_dtype)}")
            since = log_step(cfg.OUTPUT_DIR, epoch, step, loss_row, since, images_per_step)
            bar.set_postfix(loss=f"{sums[0].item() / done:.3f}", lr=f"{state.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{done * images_per_step / (time.perf_counter() - start):.1f}")
        tick = time.perf_counter()
    utils.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    means = (utils.all_reduce_sum(sums) / (max(done, 1) * world_size)).tolist()
    stats = {"loss": means[0], **{f"loss_{k}": v for k, v in zip(LOSS_TERMS, means[1:])},
             "images_per_s": done * images_per_step / seconds, "step_time_s": seconds / max(done, 1),
             "data_time_s": data_time / max(done, 1)}
    return stats, (start_step + done if stopped else None)


def check_disjoint_identities(pids, world_size):
    """Guard the distributed PK sampler: the ranks' first batches must hold disjoint identities."""
    gathered = [torch.empty_like(pids) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, pids)
    sets = [set(p.tolist()) for p in gathered]
    if sum(len(s) for s in sets) != len(set().union(*sets)):
        raise RuntimeError(f"ranks share identities in one step: {sets}")
    print(f"identities disjoint across {world_size} ranks (checked on the epoch's first step)", flush=True)


# ---------------------------------------------------------------------------------------------------
# An epoch's end: the evaluation and the checkpoint save

def evaluate_epoch(state, data, cfg, device, rank, world_size):
    """evaluate_splits's results on rank 0 (None on the others), with TEST.REPORT's page written by rank 0 (a
    failure to write it is a warning). A query or gallery file that cannot be read is left out (DATALOADER.SKIP_BAD)
    or stops every rank (faults.BadImageStop), as the config's UnreadableImages policy says."""
    try:
        evaluated = evaluate_splits(state.model, data, cfg, device, state.amp_dtype, rank, world_size)
    except utils.DataError as err:  # every rank gets it, with the message of the rank that met the file
        raise faults.BadImageStop(str(err)) from None
    write_config_report(cfg, data, evaluated)
    return evaluated[0]


def save(state, cfg, position, names, rank, extra=None):
    """Write the training checkpoint at position (next epoch, next step) as each of names (rank 0), with every
    rank's random state. Call on every rank; returns rank 0's line for a write that failed (the files it would
    have replaced stay as they were), else None: faults.stop_if_failed then stops every rank."""
    rngs = utils.all_gather_objects(checkpoint.rng_state())
    if rank != 0:
        return None
    saved = {**checkpoint.training_checkpoint(state, cfg, *position), "rng": rngs, "world_size": len(rngs),
             **(extra or {})}
    failed = checkpoint.write(saved, [os.path.join(cfg.OUTPUT_DIR, name) for name in names])
    return faults.save_failure(*failed) if failed else None


def evaluate_and_save(state, cfg, data, device, epoch, stats, rank, world_size):
    """Log the epoch, evaluate when due, step the schedule, save the checkpoints, write metrics.jsonl and curves.
    A query or gallery file that cannot be read: last.pth holds the trained epoch, and the run stops (exit 2)."""
    lr = state.optimizer.param_groups[0]["lr"]
    log_epoch(epoch, cfg.SOLVER.MAX_EPOCHS, stats, lr, device)
    record = {"epoch": epoch + 1, "lr": lr, **stats}
    if (epoch + 1) % cfg.SOLVER.EVAL_PERIOD == 0 or epoch + 1 == cfg.SOLVER.MAX_EPOCHS:
        try:
            results = evaluate_epoch(state, data, cfg, device, rank, world_size)
        except faults.BadImageStop as stop:  # the epoch is trained, the schedule not yet stepped
            faults.stop_if_failed(save(state, cfg, (epoch, len(state.sampler)), ["last.pth"], rank,
                                       extra={"epoch_stats": stats}))
            where = f"the evaluation after epoch {epoch + 1}"
            raise faults.RunStop(2, faults.bad_image_line(stop.message, where, cfg)) from None
        if rank == 0:
            print(format_results(results), flush=True)
            record.update(flatten_results(results))
    state.scheduler.step()
    names = ["last.pth"]
    if rank == 0:
        names += checkpoint_names(state, cfg, epoch, record)
    failure = save(state, cfg, (epoch + 1, 0), names, rank)
    if rank == 0 and failure is None:
        failure = write_epoch_record(state, cfg, epoch, record)
    faults.stop_if_failed(failure)  # also the epoch's barrier


def checkpoint_names(state, cfg, epoch, record):
    """The files besides last.pth an epoch's end writes: best.pth when the monitored metric improved (state's best
    updated), checkpoint_epochN.pth every SOLVER.CHECKPOINT_PERIOD epochs; skipped images counted in record."""
    if cfg.DATALOADER.SKIP_BAD:
        record["skipped_images"] = UnreadableImages.from_config(cfg).count_skipped()
    metric, period = cfg.SOLVER.MONITOR_METRIC_NAME, cfg.SOLVER.CHECKPOINT_PERIOD
    improved = metric in record and is_better(record[metric], state.best_metric, cfg.SOLVER.MONITOR_METRIC_MODE)
    state.best_metric = record[metric] if improved else state.best_metric
    return ["best.pth"] * improved + [f"checkpoint_epoch{epoch + 1}.pth"] * (period > 0 and (epoch + 1) % period == 0)


def write_epoch_record(state, cfg, epoch, record):
    """On rank 0: the epoch's row in metrics.jsonl, TensorBoard's scalars, curves.png after an evaluation; returns the
    line for a row that could not be written (last.pth is saved already), else None."""
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        return faults.save_failure(path, err)
    visualize.log_scalars(state.writer, epoch + 1, record)
    if "mAP" in record:  # curves.png after every evaluation
        visualize.plot_curves(path, os.path.join(cfg.OUTPUT_DIR, "curves.png"))
    return None


def flatten_results(results):
    """{'image': ..., 'centroid': ..., ['centroid_original': ...]} -> metrics.jsonl keys (fractions): mAP, rank1,
    ..., centroid_mAP, ..., centroid_original_mAP, ..., and centroid_protocol."""
    row = {}
    for kind, res in results.items():
        prefix = "" if kind == "image" else kind + "_"
        row.update({f"{prefix}mAP": float(res["mAP"]), f"{prefix}mINP": float(res["mINP"])})
        row.update({f"{prefix}rank{k}": float(res["cmc"][k - 1]) for k in (1, 5, 10) if k <= len(res["cmc"])})
    row["centroid_protocol"] = results["centroid"]["protocol"]
    return row


def is_better(value, best, mode):
    """Whether a monitored metric improved."""
    return best is None or (value > best if mode == "max" else value < best)


# ---------------------------------------------------------------------------------------------------
# The run: the builders, then the epoch loop

def train(cfg, given, resume_flag, device, rank, world_size):
    """One training run (checks first: nothing is written before they pass), then its epochs: train, evaluate,
    save. Returns the exit code (faults.exit_code says how a run that stops early ends)."""
    torch.manual_seed(cfg.SOLVER.SEED)
    random.seed(cfg.SOLVER.SEED + rank)
    np.random.seed(cfg.SOLVER.SEED + rank)
    data = build_datasets(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, cfg.DATASETS.JSON_TRAIN_PATH)
    saved, saved_path = checkpoint_to_resume(resume_flag, cfg, data["num_train_pids"], rank, world_size)
    data, bad = faults.check_images_before_training(cfg, data, rank)
    loader, state = build_state(cfg, data, device, rank, world_size)
    faults.check_output_dir(cfg, checkpoint.checkpoint_bytes(state), rank)
    start_outputs(cfg, given, state, bad, rank)
    describe_run(cfg, state, device, world_size)
    if saved is not None:
        checkpoint.resume(saved, state, saved_path, cfg, functools.partial(lr_factor, cfg=cfg), rank)
    wrap_for_training(state, cfg, device, world_size)
    build_graphed_step(state, cfg, device)
    loader = faults.guard_train_loader(loader, cfg)
    trained = (saved or {}).get("epoch_stats")  # stopped between an epoch's training and its evaluation
    try:
        for epoch in range(state.next_epoch, cfg.SOLVER.MAX_EPOCHS):
            stats, stopped_at = (trained, None) if trained else train_epoch(state, loader, cfg, device, epoch, rank,
                                                                            world_size)
            if stopped_at is not None and stopped_at < len(state.sampler):  # a stop signal mid-epoch
                faults.stop_if_failed(save(state, cfg, (epoch, stopped_at), ["last.pth"], rank))
                return faults.stopped_by_signal(f"epoch {epoch + 1}, step {stopped_at}", cfg)
            with warnings.catch_warnings():
                if trained:  # the resumed optimizer stepped before the stop: torch cannot know it
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                evaluate_and_save(state, cfg, data, device, epoch, stats, rank, world_size)
            trained, state.next_step = None, 0
            if stopped_at is not None:  # the signal came on the epoch's last step: the epoch is complete
                return faults.stopped_by_signal(f"the end of epoch {epoch + 1}", cfg)
        return 0
    finally:
        if state.writer is not None:
            state.writer.close()


def train_epoch(state, loader, cfg, device, epoch, rank, world_size):
    """train_one_epoch from where the run stands; a file that cannot be read: last.pth saved at that step, and the
    run stops (exit 2) with the line naming it."""
    state.sampler.set_epoch(epoch, start_step=state.next_step)
    try:
        return train_one_epoch(state, loader, cfg, device, epoch, state.next_step, world_size)
    except faults.BadImageStop as stop:  # every rank, before the step that would use the file
        faults.stop_if_failed(save(state, cfg, (epoch, stop.step), ["last.pth"], rank))
        where = f"epoch {epoch + 1}, step {stop.step}"
        raise faults.RunStop(2, faults.bad_image_line(stop.message, where, cfg)) from None


def checkpoint_to_resume(resume_flag, cfg, num_classes, rank, world_size):
    """(the checkpoint to continue, its path) or (None, ''): rank 0 decides (two nodes' folders could disagree
    about --resume auto), every rank reads it and checks that it belongs to this run."""
    path = utils.decided_by_rank0(lambda: checkpoint.resume_path(resume_flag, cfg), rank)
    if not path:
        return None, ""
    saved = utils.on_every_rank(lambda: checkpoint.read_training_checkpoint(path, resume_flag or path,
                                                                            cfg.OUTPUT_DIR))
    checkpoint.check_resume_fits(saved, path, cfg, num_classes, world_size)
    return saved, path


def start_outputs(cfg, given, state, bad, rank):
    """On rank 0, once the checks passed: config.yaml, the images the check left out (skipped.txt), TensorBoard."""
    if rank != 0:
        return
    write_config(cfg, given)
    if bad:
        UnreadableImages.from_config(cfg).log(bad)
    state.writer = visualize.open_tensorboard(cfg.LOG_DIR or cfg.OUTPUT_DIR)
    visualize.log_config_text(state.writer, config.to_yaml(cfg))


# ---------------------------------------------------------------------------------------------------
# What a run prints and writes besides its checkpoints

def write_config(cfg, given):
    """config.yaml in OUTPUT_DIR (pass it back as --config_file to repeat the run) and the non-default keys."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(config.to_yaml(cfg))
    changed = config.differences(cfg)
    print(f"configuration: {cfg.OUTPUT_DIR}/config.yaml; {len(changed)} keys differ from the defaults"
          + "".join(f"\n  {line}" for line in changed))
    note = config.ignored_note(given)
    if note:
        print(note)


def describe_run(cfg, state, device, world_size):
    """The run's first lines after the configuration: batch make-up, the schedule on several devices, precision."""
    P, K = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    if P < 2:
        print("warning: SOLVER.IMS_PER_BATCH 1 gives batches of one identity: the triplet and centroid "
              "triplet losses have no negatives and stay 0", file=sys.stderr)
    api = utils.device_api(device)
    where = device if api == device.type else f"{api}, its tensors on the {device.type} (a stand-in)"
    steps_per_epoch = len(state.sampler)
    print(f"{P} identities x {K} images = {P * K} images per device, {world_size} device(s) "
          f"({where}) = {P * K * world_size} images per step; {steps_per_epoch} steps per epoch")
    if world_size > 1:
        print(schedule_note(state.sampler, steps_per_epoch, world_size, cfg.SOLVER.MAX_EPOCHS))
    backend, why = utils.amp_backend(cfg.SOLVER.AMP_BACKEND, device, cfg.USE_MIXED_PRECISION)
    precision = f"apex {cfg.SOLVER.AMP_OPT_LEVEL}" if state.apex_amp else state.amp_dtype or "fp32"
    print(f"precision: {precision}; mixed-precision backend {backend} ({why})")


def schedule_note(sampler, steps_per_epoch, world_size, max_epochs):
    """Updates per epoch and in all on world_size devices, beside one device's with the same P, and how to train
    with one device's schedule: P is per device (as in the original), so each step holds world_size x the images
    and an epoch makes world_size x fewer updates."""
    P, K = sampler.batch.num_ids, sampler.batch.num_instances
    one = len(PKSampler(sampler.pids, sampler.batch))
    note = (f"schedule: {world_size} devices make {steps_per_epoch} updates per epoch, {steps_per_epoch * max_epochs:,}"
            f" in {max_epochs} epochs; one device with the same P makes {one} per epoch, {one * max_epochs:,} in all "
            f"(SOLVER.IMS_PER_BATCH is P per device, as in the original). For one device's schedule: ")
    if P % world_size == 0 and P // world_size >= 2:
        note += (f"--SOLVER.IMS_PER_BATCH {P // world_size} (the same {P * K}-image step, split over the devices), "
                 "or ")
    return note + (f"multiply SOLVER.MAX_EPOCHS, LR_STEPS and WARMUP_EPOCHS by {one / steps_per_epoch:.1f} "
                   f"(as many updates, each on {world_size}x the images)")


def log_epoch(epoch, max_epochs, stats, lr, device):
    """One line per epoch: every loss term, lr, speed."""
    terms = " ".join(f"{k} {stats['loss_' + k]:.4f}" for k in LOSS_TERMS)
    print(f"epoch {epoch + 1}/{max_epochs}  loss {stats['loss']:.4f} ({terms})  lr {lr:.2e}  "
          f"{stats['images_per_s']:.1f} images/s ({device.type})  step {stats['step_time_s'] * 1000:.0f} ms "
          f"(waiting for data {stats['data_time_s'] * 1000:.0f} ms)", flush=True)


STEPS_LOG = "steps.jsonl"  # one row per logged step (rank 0): what the ModelZoo wrappers' loss file and speed read


def log_step(output_dir, epoch, step, loss_row, since, images_per_step):
    """On rank 0, append a logged step to OUTPUT_DIR/steps.jsonl: epoch and step (from 1), that step's loss, the
    steps, seconds and images/s since the previous logged step (since: its (time, steps done)), and the device type.
    Returns the since of this one. Called at log steps, which read the device anyway (first_non_finite_step)."""
    now = time.perf_counter()
    if utils.is_main_process():
        steps, seconds = step + 1 - since[1], now - since[0]
        row = {"epoch": epoch + 1, "step": step + 1, "loss": loss_row[0].item(), "steps": steps,
               "seconds": seconds, "images_per_s": steps * images_per_step / seconds,
               "device": utils.device_api(loss_row.device)}
        with contextlib.suppress(OSError):  # a full disk stops the run at the next checkpoint, which says so
            with open(os.path.join(output_dir, STEPS_LOG), "a") as f:
                f.write(json.dumps(row) + "\n")
    return now, step + 1


def last_evaluation(output_dir):
    """The last metrics.jsonl row that holds evaluation results, or None."""
    try:
        rows = visualize.read_metrics(output_dir)
    except ValueError:  # no metrics.jsonl, or no rows yet
        return None
    evaluated = [row for row in rows if "mAP" in row]
    return evaluated[-1] if evaluated else None


def summarise_runs(output_dirs, summary_path):
    """Mean +- std over runs of every metric of their last evaluation; printed and written as JSON."""
    rows = [row for row in map(last_evaluation, output_dirs) if row]
    keys = [k for k in rows[0] if k.endswith(("mAP", "mINP")) or "rank" in k] if rows else []
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows])),
                   "runs": [r[k] for r in rows]} for k in keys}
    print(f"{len(rows)} runs ({', '.join(output_dirs)}): mean +- std in %")
    for key, value in summary.items():
        print(f"  {key:16s} {100 * value['mean']:6.2f} +- {100 * value['std']:5.2f}")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# ---------------------------------------------------------------------------------------------------
# main

def resume_flag_of(opts, cfg):
    """--resume as given; under torchrun --max-restarts, a restarted group resumes by itself ('auto')."""
    if utils.restart_count() and not opts["resume"]:
        print(f"restart {utils.restart_count()} of this job (torchrun --max-restarts): resuming from "
              f"{cfg.OUTPUT_DIR}/last.pth when there is one")
        return "auto"
    return opts["resume"]


def train_runs(cfg, given, resume_flag, device, rank, world_size):
    """One run, or with REPRODUCIBLE one per seed into OUTPUT_DIR/run_<seed>/ and their summary: the exit code."""
    run = functools.partial(train, given=given, resume_flag=resume_flag, device=device, rank=rank,
                            world_size=world_size)
    if not cfg.REPRODUCIBLE:
        if cfg.REPRODUCIBLE_NUM_RUNS > 1 and "REPRODUCIBLE_NUM_RUNS" in given:
            print(f"note: REPRODUCIBLE_NUM_RUNS {cfg.REPRODUCIBLE_NUM_RUNS} applies with REPRODUCIBLE True; "
                  f"this is one run with SOLVER.SEED {cfg.SOLVER.SEED}")
        return faults.exit_code(lambda: run(cfg), cfg, rank, world_size)
    seeds = range(cfg.REPRODUCIBLE_SEED, cfg.REPRODUCIBLE_SEED + cfg.REPRODUCIBLE_NUM_RUNS)
    dirs = [os.path.join(cfg.OUTPUT_DIR, f"run_{seed}") for seed in seeds]
    for seed, run_dir in zip(seeds, dirs):
        print(f"run {seed - seeds[0] + 1}/{len(seeds)}: seed {seed}, {run_dir}", flush=True)
        seeded = cfg.replace({"SOLVER.SEED": seed, "OUTPUT_DIR": run_dir})
        code = faults.exit_code(lambda c=seeded: run(c), seeded, rank, world_size)
        if code:
            return code
    if rank == 0:
        summarise_runs(dirs, os.path.join(cfg.OUTPUT_DIR, "summary.json"))
    return 0


@utils.command
def main(argv=None):
    """Parse the configuration, then train (REPRODUCIBLE: several seeded runs and their summary) or only test;
    returns the exit code (2 and one `error: ...` line for bad input)."""
    cfg, opts, given = parse_args(argv)
    if opts["plot"]:
        return visualize.main(["curves", opts["plot"]])
    device_type = utils.pick_device_type(cfg.MODEL.DEVICE)
    local_rank = None if opts["local_rank"] is None else int(opts["local_rank"])
    device, rank, world_size, _ = utils.init_distributed(device_type, cfg.GPU_IDS, local_rank)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one rank talks
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    if cfg.TEST.ONLY_TEST:
        evaluate_checkpoint(cfg, cfg.TEST.WEIGHT or cfg.MODEL.PRETRAIN_PATH, given)
        return 0
    faults.catch_stop_signals()
    code = train_runs(cfg, given, resume_flag_of(opts, cfg), device, rank, world_size)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
