"""Train a centroid-triplet ReID model: one entrypoint for one device, torch.distributed.launch and torchrun.

    python train.py --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data --OUTPUT_DIR output
    python train.py --config_file configs/market1501_256_resnet50.yml DATASETS.ROOT_DIR /data
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...
    torchrun --nproc_per_node=8 train.py ...
"""
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import config
import utils
import visualize
from cuda_graph import WARMUP_STEPS, GraphedStep, StepHalves, graph_supported, has_sync_bn
from data import build_datasets, build_train_loader
from device_data import DeviceAugmentLoader
from evaluate import evaluate_checkpoint, evaluate_splits, format_results
from image_check import (
    GuardedImages,
    bad_images_report,
    dataset_paths,
    find_bad_images,
    preflight_check,
    with_dataset,
    without_paths,
)
from loss import CenterLoss, build_center_optimizer, compute_losses, scale_center_grads
from model import build_model, load_weights, stem_relu_message, synchronise_batch_norms
from report import write_config_report
from sampler import PKSampler
from utils import DataError

OPTIONS = [  # what is not a configuration key (config.parse adds --config_file)
    ("resume", ("--resume",), "", "auto (OUTPUT_DIR/last.pth if present), best (OUTPUT_DIR/best.pth) or a "
     "checkpoint path"),
    ("plot", ("--plot",), "", "redraw OUTPUT_DIR/curves.png from OUTPUT_DIR/metrics.jsonl and exit"),
    ("local_rank", ("--local_rank", "--local-rank"), None, "set by torch.distributed.launch"),
]


def parse_args(argv=None):
    """(Config, options, given keys) from the command line; exits 2 with a clear message on a bad key or value."""
    return config.parse_args(argv, OPTIONS, prog="train.py")


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
    loss_kwargs: dict = None  # compute_losses's keyword arguments (loss_arguments)
    num_instances: int = 4  # K
    masked: bool = False  # batches can hold mock images (USE_RESAMPLING False): the step passes is_real

    def __post_init__(self):
        self.train_model = self.train_model or self.model
        self.train_center_loss = self.train_center_loss or self.center_loss

    @property
    def optimizers(self):
        return [self.optimizer, self.center_optimizer]


# ---------------------------------------------------------------------------------------------------
# The training step and epoch

STOP = {"signal": None, "signal_time": 0.0}
SIGNAL_REPEAT_S = 1.0  # a second signal sooner than this is the first one delivered twice, not a second request


def request_stop(signum, frame):
    """First SIGINT/SIGTERM: finish the step and save; a second one exits at once. Ctrl-C under torchrun reaches
    each rank twice within milliseconds (from the terminal, then forwarded by the launcher): that counts once."""
    now = time.monotonic()
    if STOP["signal"] is not None:
        if now - STOP["signal_time"] < SIGNAL_REPEAT_S:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    STOP["signal"], STOP["signal_time"] = signum, now
    print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pth "
          "(send it again to quit at once)", file=sys.stderr, flush=True)


def forward_backward(state, images, pids, is_real=None):
    """The step's first half: zero the grads, forward, the four losses, backward (the loss scaled for fp16 or
    apex) -> the [5] loss row (total, then the terms). is_real only when batches can hold mock images."""
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    with utils.autocast(images.device, state.amp_dtype):
        feat, logits = state.train_model(images, is_real)  # mock images: the BNNeck's statistics skip them
    total, terms = compute_losses(feat.float(), logits.float(), pids, state.train_center_loss, state.num_instances,
                                  is_real=is_real, **state.loss_kwargs)
    if state.apex_amp is not None:
        with state.apex_amp.scale_loss(total, state.optimizers) as scaled:
            scaled.backward()
    else:
        state.scaler.scale(total).backward()
    return torch.stack([total.detach().float()] + [t.float() for t in terms.values()])


def apply_update(state):
    """The step's second half: the centers' gradients rescaled (unscaled first), both optimizers stepped."""
    state.scaler.unscale_(state.center_optimizer)  # a no-op unless fp16's GradScaler scaled the loss
    scale_center_grads(state.center_loss, state.loss_kwargs["center_weight"])
    state.scaler.step(state.optimizer)
    state.scaler.step(state.center_optimizer)
    state.scaler.update()


def train_step(state, images, pids, is_real=None):
    """One training step -> the [5] loss row. The one body: run as it is, or recorded in a CUDA graph
    (cuda_graph.GraphedStep replays these same two halves)."""
    loss_row = forward_backward(state, images, pids, is_real)
    apply_update(state)
    return loss_row


def stop_before_step(bad_message, world_size):
    """(a stop signal on any rank, the first rank's message about a batch it could not read, or ''): every rank asks
    before each step, so all of them stop at the same step, before any trains on a batch one could not read. One
    all-reduce of two host flags (no device sync); the messages travel only when one is set."""
    stop, bad = utils.any_rank(STOP["signal"] is not None, bad_message)
    if bad and world_size > 1:
        bad_message = next(message for message in utils.all_gather_objects(bad_message) if message)
    return stop, bad_message if bad else ""


def first_non_finite_step(device, first_bad):
    """The first step whose loss was NaN/inf on any rank, or -1: one small device collective and one host read (the
    only host sync of a step, at log steps)."""
    first_bad = utils.all_reduce_max(first_bad.clone())
    return int(first_bad.item())


def check_disjoint_identities(pids, world_size):
    """Guard the distributed PK sampler: the ranks' first batches must hold disjoint identities."""
    gathered = [torch.empty_like(pids) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, pids)
    sets = [set(p.tolist()) for p in gathered]
    if sum(len(s) for s in sets) != len(set().union(*sets)):
        raise RuntimeError(f"ranks share identities in one step: {sets}")
    print(f"identities disjoint across {world_size} ranks (checked on the epoch's first step)", flush=True)


class NonFiniteLoss(Exception):
    """The loss became NaN or inf."""


def non_finite_message(epoch, step, amp_dtype):
    """What to say when the loss is NaN/inf: lower the lr, and another precision only if one would help."""
    advice = "lower --SOLVER.BASE_LR"
    if amp_dtype == torch.float16:
        advice += ", or try --SOLVER.AMP_DTYPE bf16 (fp16 overflows past 65504)"
    elif amp_dtype == torch.bfloat16:
        advice += ", or run fp32 with --USE_MIXED_PRECISION false"
    return f"non-finite loss at epoch {epoch + 1}, step {step + 1}: stopping; last.pth still holds the last " \
           f"good state ({advice})"


def run_step(state, batch, device):
    """Move a loader batch to the device and train on it, graphed or eager -> (the loss row, pids on the device)."""
    images, pids, _, is_real = batch
    images = images.to(device, non_blocking=True, memory_format=utils.memory_format(device))
    pids = pids.to(device, non_blocking=True)
    is_real = is_real.to(device, non_blocking=True) if state.masked else None
    if state.graphed is not None:
        return state.graphed.step(images, pids, is_real), pids  # the same body, replayed as a CUDA graph
    return train_step(state, images, pids, is_real), pids


def train_one_epoch(state, loader, cfg, device, epoch, start_step, world_size):
    """Train one epoch (from start_step); returns the epoch's mean losses and speed, and where it stopped (None when
    it ran to the end). A batch that could not be read stops every rank before that step (BadImageStop)."""
    state.train_model.train()
    images_per_step = cfg.SOLVER.IMS_PER_BATCH * cfg.DATALOADER.NUM_INSTANCE * world_size
    log_period = max(1, cfg.SOLVER.LOG_PERIOD)
    sums = torch.zeros(5, device=device)  # total, centroid_triplet, triplet, xent, center
    first_bad = torch.tensor(-1, device=device)
    num_steps = len(loader.batch_sampler)
    bar = tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch + 1}", unit="step",
               disable=not utils.is_main_process(), dynamic_ncols=True, leave=False)
    done, data_time, stopped = 0, 0.0, False
    start = tick = time.perf_counter()
    since = (start, start_step)  # the previous logged step: (time, steps done), for steps.jsonl
    for step, batch in enumerate(loader, start=start_step):
        data_time += time.perf_counter() - tick
        stop, bad_message = stop_before_step(loader.bad_message, world_size)
        if bad_message:
            bar.close()
            raise BadImageStop(bad_message, step)
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
            bad_step = first_non_finite_step(device, first_bad)
            if bad_step >= 0:
                raise NonFiniteLoss(non_finite_message(epoch, bad_step, state.amp_dtype))
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


LOSS_TERMS = ("centroid_triplet", "triplet", "xent", "center")


def loss_arguments(cfg):
    """compute_losses keyword arguments from the configuration."""
    solver = cfg.SOLVER
    return {"margin": solver.MARGIN, "distance": solver.DISTANCE_FUNC, "label_smooth": solver.LABEL_SMOOTH,
            "ctl_weight": solver.CENTROID_CONTRASTIVE_WEIGHT, "triplet_weight": solver.QUERY_CONTRASTIVE_WEIGHT,
            "xent_weight": solver.QUERY_XENT_WEIGHT, "center_weight": solver.CENTER_LOSS_WEIGHT,
            "check_layout": False}


# ---------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, the main loop

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


def rng_state():
    """Python, numpy, torch and (when used) CUDA RNG states as weights_only-loadable values. Training draws nothing
    from them (the sampler and the augmentation are functions of the seed and the position): they are kept so
    that anything else drawing from them continues as it would have."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state saved."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint(state, cfg, next_epoch, next_step):
    """Everything needed to evaluate the model or continue the exact schedule."""
    return {"model": state.model.state_dict(), "center_loss": state.center_loss.state_dict(),
            "optimizer": state.optimizer.state_dict(), "center_optimizer": state.center_optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "epoch": next_epoch - 1, "next_epoch": next_epoch, "next_step": next_step,
            "best_metric": state.best_metric, "config": cfg.flat(),
            "model_name": cfg.MODEL.NAME, "num_classes": state.model.num_classes,
            "last_stride": cfg.MODEL.LAST_STRIDE, "stem_relu": state.model.stem_relu,
            "sampler": state.sampler.state_dict(), "rng": rng_state()}


class ResumeError(utils.UserError):
    """A checkpoint that cannot continue this run: the message says which key differs and what to do."""


def resume(saved, state, path, cfg, rank=0):
    """Load a checkpoint written by checkpoint() into state: weights, optimizers, schedule, sampler, position (and
    this rank's random state). The optimizers' settings stay the configuration's (see apply_settings).
    ResumeError when its tensors do not fit the model built now."""
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                for opt in state.optimizers]  # what the configuration asks for, before the saved state replaces it
    try:
        state.model.load_state_dict(saved["model"])
        state.center_loss.load_state_dict(saved["center_loss"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.center_optimizer.load_state_dict(saved["center_optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.scaler.load_state_dict(saved["scaler"])
        state.sampler.load_state_dict(saved["sampler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise ResumeError(f"--resume {path}: the checkpoint does not fit the model built now "
                          f"({utils.first_line(err)}): {NEW_RUN_ADVICE.format(path=path)}") from None
    apply_settings(state, settings, cfg)
    rng = saved["rng"]  # one state per rank since distributed runs save every rank's; a dict before
    set_rng_state(rng[rank if rank < len(rng) else 0] if isinstance(rng, list) else rng)
    state.next_epoch, state.next_step, state.best_metric = saved["next_epoch"], saved["next_step"], saved["best_metric"]
    print(f"resumed from {path}: epoch {state.next_epoch + 1}, step {state.next_step}, "
          f"lr {state.optimizer.param_groups[0]['lr']:.2e}")
    changed = [f"{key} was {_shown(saved['config'][key])}, now {_shown(cfg[key])}" for key in APPLIED_ON_RESUME
               if key in saved.get("config", {}) and _as_saved(saved["config"][key]) != cfg[key]]
    if changed:
        print(f"note: --resume {path}: {'; '.join(changed)}: applied from here on (the optimizers' moments and "
              "the position in the schedule are the checkpoint's)")


# What a resumed run takes from the configuration rather than from the checkpoint's optimizer and scheduler state
# (which would otherwise bring back the old values unsaid); the resume note names each that changed.
APPLIED_ON_RESUME = ("SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.MOMENTUM", "SOLVER.CENTER_LR",
                     "SOLVER.LR_SCHEDULER_NAME", "SOLVER.LR_STEPS", "SOLVER.GAMMA", "SOLVER.USE_WARMUP_LR",
                     "SOLVER.WARMUP_EPOCHS", "SOLVER.MIN_LR")


def apply_settings(state, settings, cfg):
    """Give the loaded optimizers the configuration's settings (lr, weight decay, momentum ...) and the scheduler
    its base lr, then set each lr where the schedule stands (LambdaLR: base lr x lr_factor of its epoch)."""
    for opt, groups in zip(state.optimizers, settings):
        for group, wanted in zip(opt.param_groups, groups):
            group.update(wanted)
    scheduler = state.scheduler
    scheduler.base_lrs = [group["initial_lr"] for group in state.optimizer.param_groups]
    for group, base in zip(state.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(scheduler.last_epoch, cfg)
    scheduler._last_lr = [group["lr"] for group in state.optimizer.param_groups]  # what get_last_lr() reports


NEW_RUN_ADVICE = "or train from its weights in a new OUTPUT_DIR with --MODEL.PRETRAIN_PATH {path}"
RESUME_KEYS = (("DATASETS.NAMES", "another data set"), ("MODEL.NAME", "another backbone"),
               ("SOLVER.IMS_PER_BATCH", "another P: every epoch's batches differ"),
               ("DATALOADER.NUM_INSTANCE", "another K: every epoch's batches differ"),
               ("DATALOADER.SAMPLER", "another sampler: every epoch's batches differ"),
               ("SOLVER.OPTIMIZER_NAME", "another optimizer: its saved state does not apply"))


def resolve_resume(value, cfg):
    """--resume auto -> OUTPUT_DIR/last.pth when it exists; best -> OUTPUT_DIR/best.pth; a path must exist.
    MODEL.RESUME_TRAINING resumes MODEL.PRETRAIN_PATH, as the original does."""
    if not value and cfg.MODEL.RESUME_TRAINING:
        if not cfg.MODEL.PRETRAIN_PATH:
            raise utils.UserError("MODEL.RESUME_TRAINING True needs MODEL.PRETRAIN_PATH: the checkpoint to continue")
        value = cfg.MODEL.PRETRAIN_PATH
    if not value:
        return ""
    if value == "auto":
        path = os.path.join(cfg.OUTPUT_DIR, "last.pth")
        return path if os.path.exists(path) else ""
    path = os.path.join(cfg.OUTPUT_DIR, "best.pth") if value == "best" else value
    if not os.path.exists(path):
        raise ResumeError(f"--resume {value}: no {path} (--resume auto continues from OUTPUT_DIR/last.pth, "
                          "--resume best from OUTPUT_DIR/best.pth)")
    return path


def read_checkpoint(path, value, output_dir):
    """The training checkpoint at path; ResumeError when it is unreadable, damaged (truncated) or only weights."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ResumeError(f"--resume {value}: cannot read {path} ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001  (zip, pickle and EOF errors all mean a damaged file)
        if "weights only load failed" in str(err).lower():  # whole, but pickled objects: another program's file
            raise ResumeError(f"--resume {value}: {path} is not a checkpoint of train.py (it holds Python objects): "
                              f"to start from its weights use --MODEL.PRETRAIN_PATH {path}") from None
        best = os.path.join(output_dir, "best.pth")
        instead = "continue from best.pth (its epoch) with --resume best, or " \
            if value == "auto" and os.path.exists(best) else ""
        raise ResumeError(f"--resume {value}: {path} is damaged, truncated perhaps by a full disk or a copy cut "
                          f"short ({utils.first_line(err, 100)}): {instead}delete it to start afresh") from None
    if not isinstance(saved, dict) or not {"model", "optimizer", "next_epoch", "next_step", "sampler"} <= set(saved):
        raise ResumeError(f"--resume {value}: {path} holds weights but no training state (optimizer, schedule, "
                          f"position): to start from its weights use --MODEL.PRETRAIN_PATH {path}")
    return saved


def _as_saved(value):
    return tuple(value) if isinstance(value, list) else value


def _shown(value):
    """A key's value as typed on the command line (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_fits(saved, path, cfg, num_classes, world_size):
    """ResumeError naming the first key that makes the checkpoint another run; a note for a changed MAX_EPOCHS."""
    old = saved.get("config") or {}
    for key, what in RESUME_KEYS:
        if key in old and _as_saved(old[key]) != cfg[key] and not (
                key == "DATASETS.NAMES" and [n.lower() for n in old[key]] == [n.lower() for n in cfg[key]]):
            was = _shown(old[key])
            raise ResumeError(f"--resume {path}: {key} is {was} in the checkpoint but {_shown(cfg[key])} now "
                              f"({what}): resume with --{key} {was}, {NEW_RUN_ADVICE.format(path=path)}")
    if saved.get("num_classes", num_classes) != num_classes:
        raise ResumeError(f"--resume {path}: the checkpoint's classifier has {saved['num_classes']} classes but the "
                          f"training set now has {num_classes} identities (another data set or DATASETS.ROOT_DIR): "
                          f"resume with the data it was trained on, {NEW_RUN_ADVICE.format(path=path)}")
    saved_world = saved.get("world_size", world_size)
    if saved_world != world_size and saved["next_step"] > 0:
        raise ResumeError(f"--resume {path}: the run stopped mid-epoch with {saved_world} processes, this one has "
                          f"{world_size}: continue it with {saved_world} (a checkpoint from an epoch's end resumes "
                          "with any number)")
    old_max = old.get("SOLVER.MAX_EPOCHS", cfg.SOLVER.MAX_EPOCHS)
    if old_max != cfg.SOLVER.MAX_EPOCHS:
        left = "nothing is left to train" if saved["next_epoch"] >= cfg.SOLVER.MAX_EPOCHS else \
            f"training continues to epoch {cfg.SOLVER.MAX_EPOCHS}"
        cosine = " (cosine_annealing: the lr curve follows the new length)" \
            if cfg.SOLVER.LR_SCHEDULER_NAME == "cosine_annealing" else ""
        print(f"note: --resume {path}: SOLVER.MAX_EPOCHS was {old_max}, now {cfg.SOLVER.MAX_EPOCHS}: {left}{cosine}")


def is_better(value, best, mode):
    """Whether a monitored metric improved."""
    return best is None or (value > best if mode == "max" else value < best)


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


# ---------------------------------------------------------------------------------------------------
# Building a run

def build_loader(cfg, data, device, rank, world_size):
    """(train loader, its PK sampler) on the CPU workers, or decoding and augmenting on the device."""
    inputs = cfg.INPUT
    args = (data["train"], cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE, inputs.SIZE_TRAIN,
            cfg.DATALOADER.NUM_WORKERS)
    kwargs = {"seed": cfg.SOLVER.SEED, "rank": rank, "world_size": world_size, "flip_prob": inputs.PROB,
              "padding": inputs.PADDING, "re_prob": inputs.RE_PROB, "sampler": cfg.DATALOADER.SAMPLER,
              "use_resampling": cfg.DATALOADER.USE_RESAMPLING, "drop_last": cfg.DATALOADER.DROP_LAST,
              "pixel_mean": inputs.PIXEL_MEAN, "pixel_std": inputs.PIXEL_STD, "with_is_real": True}
    if inputs.DEVICE_AUGMENT:
        loader = DeviceAugmentLoader(*args, device, **kwargs)
        return loader, loader.batch_sampler
    return build_train_loader(*args, **kwargs)


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
    state.graphed = graphed_step(state, (cfg.SOLVER.IMS_PER_BATCH * state.num_instances, 3, *cfg.INPUT.SIZE_TRAIN))
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


def build_state(cfg, data, device, rank, world_size):
    """Loader, model, losses, optimizers, schedule and precision of a run, ready to train."""
    loader, sampler = build_loader(cfg, data, device, rank, world_size)
    model, center_loss = build_network(cfg, data["num_train_pids"], device)
    optimizer, center_optimizer, scheduler = build_optimizers(cfg, model, center_loss)
    amp_dtype, needs_scaler = utils.amp_settings(device.type, cfg.USE_MIXED_PRECISION, cfg.SOLVER.AMP_DTYPE)
    state = TrainState(model, center_loss, optimizer, center_optimizer, scheduler,
                       utils.make_grad_scaler(device, needs_scaler), sampler, amp_dtype=amp_dtype,
                       loss_kwargs=loss_arguments(cfg), num_instances=cfg.DATALOADER.NUM_INSTANCE,
                       masked=not cfg.DATALOADER.USE_RESAMPLING)
    if utils.amp_backend(cfg.SOLVER.AMP_BACKEND, device, cfg.USE_MIXED_PRECISION)[0] == "apex":
        setup_apex(state, cfg, device)
    return loader, state


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


def describe_run(cfg, state, device, world_size, steps_per_epoch):
    """The run's first lines after the configuration: batch make-up, precision."""
    P, K = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    if P < 2:
        print("warning: SOLVER.IMS_PER_BATCH 1 gives batches of one identity: the triplet and centroid "
              "triplet losses have no negatives and stay 0", file=sys.stderr)
    api = utils.device_api(device)
    where = device if api == device.type else f"{api}, its tensors on the {device.type} (a stand-in)"
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
    P, K = sampler.num_ids, sampler.num_instances
    one = len(PKSampler(sampler.pids, P, K, sampler.seed, 0, 1, sampler.sampler, sampler.use_resampling,
                        sampler.drop_last))
    note = (f"schedule: {world_size} devices make {steps_per_epoch} updates per epoch, {steps_per_epoch * max_epochs:,}"
            f" in {max_epochs} epochs; one device with the same P makes {one} per epoch, {one * max_epochs:,} in all "
            f"(SOLVER.IMS_PER_BATCH is P per device, as in the original). For one device's schedule: ")
    if P % world_size == 0 and P // world_size >= 2:
        note += (f"--SOLVER.IMS_PER_BATCH {P // world_size} (the same {P * K}-image step, split over the devices), "
                 "or ")
    return note + (f"multiply SOLVER.MAX_EPOCHS, LR_STEPS and WARMUP_EPOCHS by {one / steps_per_epoch:.1f} "
                   f"(as many updates, each on {world_size}x the images)")


# ---------------------------------------------------------------------------------------------------
# Writing the configuration

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


# ---------------------------------------------------------------------------------------------------
# Faults: bad images met mid-run, checkpoints that do not fit, a folder that cannot take a checkpoint

SKIPPED = "skipped.txt"  # with DATALOADER.SKIP_BAD: the images left out or replaced, one "path<TAB>why" a line


class RunStop(Exception):
    """End the run with an exit code after a message (printed by rank 0)."""

    def __init__(self, code, message=""):
        super().__init__(message)
        self.code, self.message = code, message


class BadImageStop(Exception):
    """A file could not be read mid-run: the message names it; step (training) is the step it would have been in."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.message, self.step = message, step


class GuardedLoader:
    """The training loader; a batch it cannot read (a file gone bad, a JPEG the device decoder rejects) ends the
    iteration, with bad_message saying which file: train_one_epoch then stops every rank before that step."""

    def __init__(self, loader):
        self.loader, self.batch_sampler, self.bad_message = loader, loader.batch_sampler, ""

    def __iter__(self):
        self.bad_message = ""
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as err:
                self.bad_message = str(err)
                yield None  # the step this batch was for: every rank agrees there to stop
                return
            yield batch


def guard_train_loader(loader, cfg):
    """Make the training loader survive a file that goes bad mid-run. DATALOADER.SKIP_BAD: the image is replaced by
    another of its identity (with its augmentation seed) and logged in skipped.txt. Without it, every rank stops
    before the step that needed the file (GuardedLoader), and the run saves last.pth there."""
    inner = loader.loader if isinstance(loader, DeviceAugmentLoader) else loader  # its DataLoader of files
    if cfg.DATALOADER.SKIP_BAD and hasattr(getattr(inner, "dataset", None), "items"):
        guarded = with_dataset(inner, GuardedImages(inner.dataset, log_path=os.path.join(cfg.OUTPUT_DIR, SKIPPED)))
        if isinstance(loader, DeviceAugmentLoader):
            loader.loader = guarded
        else:
            loader = guarded
    return GuardedLoader(loader)


def resume_command(output_dir):
    """The command that continues this run."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={local} " if local > 1 else "python "
    return f"{launcher}train.py --config_file {output_dir}/config.yaml --resume auto"


def resume_hint(output_dir):
    """How to go on after a failure that saved nothing: from last.pth if an earlier save left one; by itself when
    torchrun has restarts left (--max-restarts)."""
    saved = os.path.exists(os.path.join(output_dir, "last.pth"))
    if utils.restart_count() < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        return (f"torchrun restarts the group, which {'resumes from last.pth' if saved else 'starts again'} by itself "
                f"(restart {utils.restart_count() + 1} of {os.environ['TORCHELASTIC_MAX_RESTARTS']})")
    if saved:
        return f"continue from {output_dir}/last.pth with: {resume_command(output_dir)}"
    return "no last.pth was saved yet: start again with the same command"


def bad_image_line(message, where, cfg):
    """The one line that ends a run stopped by a bad image (after a line break: the progress bar holds the line)."""
    skip = "" if cfg.DATALOADER.SKIP_BAD else " (or set --DATALOADER.SKIP_BAD true)"  # set: a device decode failed
    return (f"\nerror: {message}; stopped at {where}, saved {cfg.OUTPUT_DIR}/last.pth: replace the file{skip}, "
            f"then continue with: {resume_command(cfg.OUTPUT_DIR)}")


def log_skipped(output_dir, bad):
    """Add [(path, why)] not yet listed to OUTPUT_DIR/skipped.txt, with a warning each."""
    listed = read_skipped(output_dir)
    new = [(path, why) for path, why in dict(bad).items() if path not in listed]
    if not new:
        return
    for path, why in new:
        print(f"warning: skipped {path}: {why}", file=sys.stderr, flush=True)
    with open(os.path.join(output_dir, SKIPPED), "a") as f:
        f.writelines(f"{path}\t{why}\n" for path, why in new)


def read_skipped(output_dir):
    """{path: why} of skipped.txt (several loader processes may have listed a file: once each here)."""
    path = os.path.join(output_dir, SKIPPED)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def count_skipped(output_dir):
    """The number of distinct files skipped so far; rewrites skipped.txt with each once."""
    skipped = read_skipped(output_dir)
    if skipped:
        utils.write_text_atomic(os.path.join(output_dir, SKIPPED), "".join(f"{p}\t{w}\n" for p, w in skipped.items()))
    return len(skipped)


def check_images(cfg, data, rank):
    """The pre-flight image check on rank 0 (DATALOADER.CHECK_IMAGES): the data set without bad files when
    DATALOADER.SKIP_BAD, or RunStop(2) listing them. Every rank gets rank 0's verdict."""
    bad = []
    if rank == 0 and cfg.DATALOADER.CHECK_IMAGES:
        bad = preflight_check(data, cfg.DATALOADER.NUM_WORKERS, jpeg_only=cfg.INPUT.DEVICE_AUGMENT)
    bad = utils.from_rank0(bad)
    if not bad:
        return data, []
    report = bad_images_report(bad, len(dataset_paths(data)), cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR)
    if not cfg.DATALOADER.SKIP_BAD:
        raise RunStop(2, f"error: {report}\nreplace or remove them, or set --DATALOADER.SKIP_BAD true to train "
                         "without them (--DATALOADER.CHECK_IMAGES false skips this check)")
    if rank == 0:
        print(f"warning: {report}\nDATALOADER.SKIP_BAD: training and evaluating without them "
              f"(listed in {cfg.OUTPUT_DIR}/{SKIPPED})", file=sys.stderr, flush=True)
    return without_paths(data, [path for path, _ in bad]), bad


def evaluate_epoch(state, data, cfg, device, rank, world_size):
    """evaluate_splits's results (rank 0), surviving a query or gallery file that cannot be read. Without
    DATALOADER.SKIP_BAD: BadImageStop on every rank (the epoch is trained: a resumed run evaluates it). With it:
    rank 0 finds the bad files, every rank leaves them out of data for good (skipped.txt), and the evaluation
    is repeated. With TEST.REPORT, rank 0 then writes the evaluation's HTML page (a failure to write is a warning)."""
    while True:
        try:
            evaluated = evaluate_splits(state.model, data, cfg, device, state.amp_dtype, rank, world_size)
            write_config_report(cfg, data, evaluated)
            return evaluated[0]
        except DataError as err:  # every rank gets it, with the message of the rank that met the file
            if not cfg.DATALOADER.SKIP_BAD:
                raise BadImageStop(str(err)) from None
            bad = None
            if rank == 0:
                bad = find_bad_images(dataset_paths(data, ("query", "gallery")), cfg.DATALOADER.NUM_WORKERS,
                                      cfg.INPUT.DEVICE_AUGMENT, progress=False)
                log_skipped(cfg.OUTPUT_DIR, bad)
            bad = utils.from_rank0(bad)
            if not bad:  # it failed, then read: a flaky mount; stop rather than go round
                raise BadImageStop(str(err)) from None
            data.update(without_paths(data, [path for path, _ in bad]))


def checkpoint_bytes(state):
    """An upper bound of a checkpoint's size: weights and buffers, and two optimizer moments per weight."""
    tensors = list(state.model.state_dict().values()) + list(state.center_loss.state_dict().values())
    return 3 * sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


def check_output_dir(cfg, state, rank):
    """On rank 0: OUTPUT_DIR takes a file the size of a checkpoint, or RunStop(2) saying why not (every rank)."""
    message = None
    if rank == 0:
        nbytes = checkpoint_bytes(state)
        try:
            utils.probe_output_dir(cfg.OUTPUT_DIR, nbytes)
        except OSError as err:
            message = (f"error: --OUTPUT_DIR {cfg.OUTPUT_DIR} cannot take a checkpoint ({nbytes / 2**20:.0f} MB): "
                       f"{err.strerror or err}; free space there or choose another OUTPUT_DIR")
    message = utils.from_rank0(message)
    if message:
        raise RunStop(2, message)


def save_failure(path, err):
    """The one line for a checkpoint that could not be written: the file, why, and that the last one is intact."""
    last = os.path.join(os.path.dirname(path), "last.pth")
    if os.path.exists(last):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(last)))
        kept = f"{last} from {when} is intact"
    else:
        kept = "no last.pth was saved before"
    fix = "free space in" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix"
    return (f"error: cannot write {path} ({err.strerror or err}): {kept}; {fix} {os.path.dirname(path)}, "
            f"then continue with: {resume_command(os.path.dirname(path))}")


def save_checkpoints(state, cfg, next_epoch, next_step, rank, world_size, names, extra=None):
    """Write the checkpoint as each of names (rank 0), with every rank's random state; returns the failure line of
    a write that failed (the files it would have replaced stay as they were), or None. Call on every rank."""
    rngs = utils.all_gather_objects(rng_state())
    if rank != 0:
        return None
    saved = {**checkpoint(state, cfg, next_epoch, next_step), "rng": rngs, "world_size": world_size, **(extra or {})}
    for name in names:
        path = os.path.join(cfg.OUTPUT_DIR, name)
        try:
            utils.save_atomic(saved, path)
        except OSError as err:
            return save_failure(path, err)
    return None


def save_or_stop(failure):
    """Every rank stops (exit 2) when rank 0's save failed."""
    failure = utils.from_rank0(failure)
    if failure:
        raise RunStop(2, failure)


# ---------------------------------------------------------------------------------------------------
# The main loop

def prepare(cfg, given, resume_flag, device, rank, world_size):
    """Everything before the first step, ordered so that nothing is written until the checks pass: the data, the
    checkpoint to resume (does it fit?), the images, the model, OUTPUT_DIR; then config.yaml."""
    data = build_datasets(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, cfg.DATASETS.JSON_TRAIN_PATH)
    # rank 0 decides whether to resume (two nodes' folders could disagree about --resume auto); every rank reads
    resume_path = utils.decided_by_rank0(lambda: resolve_resume(resume_flag, cfg), rank)
    saved = None
    if resume_path:
        saved = utils.on_every_rank(lambda: read_checkpoint(resume_path, resume_flag or resume_path, cfg.OUTPUT_DIR))
        check_resume_fits(saved, resume_path, cfg, data["num_train_pids"], world_size)
    data, bad = check_images(cfg, data, rank)
    loader, state = build_state(cfg, data, device, rank, world_size)
    check_output_dir(cfg, state, rank)
    if rank == 0:
        write_config(cfg, given)
        if bad:
            log_skipped(cfg.OUTPUT_DIR, bad)
        state.writer = visualize.open_tensorboard(cfg.LOG_DIR or cfg.OUTPUT_DIR)
        visualize.log_config_text(state.writer, config.to_yaml(cfg))
    describe_run(cfg, state, device, world_size, len(state.sampler))
    if saved is not None:
        resume(saved, state, resume_path, cfg, rank)
    wrap_for_training(state, cfg, device, world_size)
    build_graphed_step(state, cfg, device)
    return data, guard_train_loader(loader, cfg), state, (saved or {}).get("epoch_stats")


def run(cfg, given, resume_flag, device, rank, world_size):
    """One training run: check, build, resume if asked, train with per-epoch evaluation. Returns the exit code."""
    torch.manual_seed(cfg.SOLVER.SEED)
    random.seed(cfg.SOLVER.SEED + rank)
    np.random.seed(cfg.SOLVER.SEED + rank)
    try:
        data, loader, state, trained_stats = prepare(cfg, given, resume_flag, device, rank, world_size)
        try:
            return train_epochs(cfg, data, loader, state, device, rank, world_size, trained_stats)
        finally:
            if state.writer is not None:
                state.writer.close()
    except ResumeError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RunStop as stop:
        if stop.message and rank == 0:
            print(stop.message, file=sys.stderr, flush=True)
        return stop.code
    except RuntimeError as err:  # a collective that failed because a rank died, or a real error
        message = utils.collective_failure(err) if world_size > 1 else None
        if message is None:
            raise
        print(f"\nerror: rank {rank}: {message}; stopping: {resume_hint(cfg.OUTPUT_DIR)}", file=sys.stderr, flush=True)
        return 1


def train_epochs(cfg, data, loader, state, device, rank, world_size, trained_stats=None):
    """The epochs from state.next_epoch: train, then finish (evaluate, save); stops save where they are."""
    for epoch in range(state.next_epoch, cfg.SOLVER.MAX_EPOCHS):
        stopped_at = None
        evaluate_only = trained_stats is not None and state.next_step >= len(state.sampler)
        if evaluate_only:
            stats = trained_stats  # stopped between training and evaluating this epoch: evaluate now
        else:
            state.sampler.set_epoch(epoch, start_step=state.next_step)
            try:
                stats, stopped_at = train_one_epoch(state, loader, cfg, device, epoch, state.next_step, world_size)
            except NonFiniteLoss as err:
                raise RunStop(1, f"error: {err}") from None
            except BadImageStop as stop:  # every rank, before the step that would use the file
                save_or_stop(save_checkpoints(state, cfg, epoch, stop.step, rank, world_size, ["last.pth"]))
                raise RunStop(2, bad_image_line(stop.message, f"epoch {epoch + 1}, step {stop.step}", cfg)) from None
            if stopped_at is not None and stopped_at < len(state.sampler):  # mid-epoch: save where it stopped
                save_or_stop(save_checkpoints(state, cfg, epoch, stopped_at, rank, world_size, ["last.pth"]))
                return stopped(f"epoch {epoch + 1}, step {stopped_at}", cfg)
        trained_stats, state.next_step = None, 0
        try:
            with warnings.catch_warnings():
                if evaluate_only:  # the resumed optimizer stepped before the stop: torch cannot know it
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                finish_epoch(state, cfg, data, device, epoch, stats, rank, world_size)
        except BadImageStop as stop:  # in the evaluation: the epoch is trained, the schedule not yet stepped
            steps = len(state.sampler)
            save_or_stop(save_checkpoints(state, cfg, epoch, steps, rank, world_size, ["last.pth"],
                                          extra={"epoch_stats": stats}))
            raise RunStop(2, bad_image_line(stop.message, f"the evaluation after epoch {epoch + 1}", cfg)) from None
        if stopped_at is not None:  # the signal came on the epoch's last step: the epoch is complete
            return stopped(f"the end of epoch {epoch + 1}", cfg)
    return 0


def finish_epoch(state, cfg, data, device, epoch, stats, rank, world_size):
    """Log the epoch, evaluate when due, step the schedule, write metrics.jsonl and the checkpoints."""
    max_epochs, output_dir = cfg.SOLVER.MAX_EPOCHS, cfg.OUTPUT_DIR
    lr = state.optimizer.param_groups[0]["lr"]
    log_epoch(epoch, max_epochs, stats, lr, device)
    record = {"epoch": epoch + 1, "lr": lr, **stats}
    if (epoch + 1) % cfg.SOLVER.EVAL_PERIOD == 0 or epoch + 1 == max_epochs:
        results = evaluate_epoch(state, data, cfg, device, rank, world_size)
        if rank == 0:
            print(format_results(results), flush=True)
            record.update(flatten_results(results))
    state.scheduler.step()
    names = ["last.pth"]
    if rank == 0:
        if cfg.DATALOADER.SKIP_BAD:
            record["skipped_images"] = count_skipped(output_dir)
        metric = cfg.SOLVER.MONITOR_METRIC_NAME
        improved = metric in record and is_better(record[metric], state.best_metric, cfg.SOLVER.MONITOR_METRIC_MODE)
        state.best_metric = record[metric] if improved else state.best_metric
        period = cfg.SOLVER.CHECKPOINT_PERIOD
        names += ["best.pth"] * improved
        names += [f"checkpoint_epoch{epoch + 1}.pth"] * (period > 0 and (epoch + 1) % period == 0)
    failure = save_checkpoints(state, cfg, epoch + 1, 0, rank, world_size, names)
    if rank == 0 and failure is None:
        try:
            with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            failure = save_failure(os.path.join(output_dir, "metrics.jsonl"), err)
    if rank == 0 and failure is None:
        visualize.log_scalars(state.writer, epoch + 1, record)
        if "mAP" in record:  # curves.png after every evaluation
            visualize.plot_curves(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "curves.png"))
    save_or_stop(failure)  # also the epoch's barrier


def stopped(where, cfg):
    """After a stop signal at a step boundary: say where; exit code 128 + the signal (SIGINT/SIGTERM)."""
    print(f"stopped at {where}: saved {cfg.OUTPUT_DIR}/last.pth (continue with --resume auto)", flush=True)
    return 128 + (STOP["signal"] or signal.SIGTERM)  # another rank's signal: this one stops as if it got it too


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
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    resume_flag = opts["resume"]
    if utils.restart_count() and not resume_flag:  # torchrun --max-restarts restarted the group after a failure
        resume_flag = "auto"
        print(f"restart {utils.restart_count()} of this job (torchrun --max-restarts): resuming from "
              f"{cfg.OUTPUT_DIR}/last.pth when there is one")
    if not cfg.REPRODUCIBLE:
        if cfg.REPRODUCIBLE_NUM_RUNS > 1 and "REPRODUCIBLE_NUM_RUNS" in given:
            print(f"note: REPRODUCIBLE_NUM_RUNS {cfg.REPRODUCIBLE_NUM_RUNS} applies with REPRODUCIBLE True; "
                  f"this is one run with SOLVER.SEED {cfg.SOLVER.SEED}")
        code = run(cfg, given, resume_flag, device, rank, world_size)
    else:
        seeds = range(cfg.REPRODUCIBLE_SEED, cfg.REPRODUCIBLE_SEED + cfg.REPRODUCIBLE_NUM_RUNS)
        dirs = [os.path.join(cfg.OUTPUT_DIR, f"run_{seed}") for seed in seeds]
        for seed, run_dir in zip(seeds, dirs):
            print(f"run {seed - seeds[0] + 1}/{len(seeds)}: seed {seed}, {run_dir}", flush=True)
            code = run(cfg.replace({"SOLVER.SEED": seed, "OUTPUT_DIR": run_dir}), given, resume_flag,
                       device, rank, world_size)
            if code:
                break
        if rank == 0 and not code:
            summarise_runs(dirs, os.path.join(cfg.OUTPUT_DIR, "summary.json"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
