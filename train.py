"""Train a centroid-triplet ReID model: one entrypoint for one device, torch.distributed.launch and torchrun.

    python train.py --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data --OUTPUT_DIR output
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...
    torchrun --nproc_per_node=8 train.py ...
"""
import argparse
import difflib
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import utils
from data import (DataError, DeviceAugmentLoader, build_datasets, build_test_loader, build_train_loader,
                  item_labels)
from evaluate import evaluate_features, extract_features, format_results
from loss import CenterLoss, build_center_optimizer, compute_losses, scale_center_grads
from model import WeightError, build_model, load_weights

# (flag, default, help). Names and defaults follow the original centroids-reid configuration.
FLAGS = [
    ("GPU_IDS", [], "device ids the local ranks use, e.g. 0 1 2 3 (default: all visible)"),
    ("MODEL.DEVICE", "auto", "auto | npu | cuda | cpu (auto: NPU if torch_npu imports, else CUDA, else CPU)"),
    ("MODEL.NAME", "resnet50", "backbone: resnet18/34/50/101/152, resnet50_ibn_a, resnet101_ibn_a"),
    ("MODEL.LAST_STRIDE", 1, "stride of layer4 (1 keeps a 16x8 map at 256x128)"),
    ("MODEL.PRETRAINED", True, "start from ImageNet weights (models/resnet50-19c8e357.pth for resnet50)"),
    ("MODEL.PRETRAIN_PATH", "", "weights to start from: ImageNet file, our checkpoint or an original .ckpt"),
    ("MODEL.BACKBONE_EMB_SIZE", 0, "embedding size; 0 follows the backbone (2048 for resnet50)"),
    ("MODEL.USE_CENTROIDS", True, "report centroid retrieval beside per-image retrieval"),
    ("MODEL.KEEP_CAMID_CENTROIDS", True, "centroids built from other cameras only (ReID sets with cameras)"),
    ("INPUT.SIZE_TRAIN", [256, 128], "training image size H W"),
    ("INPUT.SIZE_TEST", [256, 128], "test image size H W"),
    ("INPUT.PROB", 0.5, "horizontal flip probability"),
    ("INPUT.RE_PROB", 0.5, "random erasing probability"),
    ("INPUT.PADDING", 10, "padding before the random crop, pixels"),
    ("INPUT.DEVICE_AUGMENT", False, "decode JPEGs and augment whole batches on the training device (nvjpeg on "
     "CUDA): for when the CPU loader is the limit; loader workers then only read files"),
    ("DATASETS.NAMES", ["market1501"], "data set names; several train on their union, the first is evaluated"),
    ("DATASETS.ROOT_DIR", "data", "folder holding the data set folder (or the data set folder itself)"),
    ("DATALOADER.NUM_WORKERS", 6, "loader processes per device"),
    ("DATALOADER.NUM_INSTANCE", 4, "K: images per identity in a batch (>= 2)"),
    ("SOLVER.OPTIMIZER_NAME", "Adam", "Adam | AdamW | SGD"),
    ("SOLVER.BASE_LR", 3.5e-4, "learning rate after warm-up"),
    ("SOLVER.MOMENTUM", 0.9, "SGD momentum"),
    ("SOLVER.WEIGHT_DECAY", 5e-4, "weight decay"),
    ("SOLVER.MAX_EPOCHS", 120, "epochs"),
    ("SOLVER.IMS_PER_BATCH", 16, "P: identities per device per step (a batch holds P x K images)"),
    ("SOLVER.WARMUP_EPOCHS", 10, "linear warm-up epochs: lr x (epoch+1)/WARMUP_EPOCHS"),
    ("SOLVER.STEPS", [40, 70], "epochs at which the lr is multiplied by GAMMA"),
    ("SOLVER.GAMMA", 0.1, "lr decay factor"),
    ("SOLVER.MARGIN", 0.5, "triplet and centroid-triplet margin"),
    ("SOLVER.DISTANCE_FUNC", "euclidean", "euclidean | cosine, for the triplet losses"),
    ("SOLVER.LABEL_SMOOTH", 0.1, "label smoothing epsilon of the cross-entropy"),
    ("SOLVER.CENTER_LR", 0.5, "SGD learning rate of the center-loss centers"),
    ("SOLVER.CENTER_LOSS_WEIGHT", 5e-4, "weight of the center loss"),
    ("SOLVER.CENTROID_CONTRASTIVE_WEIGHT", 1.0, "weight of the centroid triplet loss"),
    ("SOLVER.QUERY_CONTRASTIVE_WEIGHT", 1.0, "weight of the batch-hard triplet loss"),
    ("SOLVER.QUERY_XENT_WEIGHT", 1.0, "weight of the cross-entropy"),
    ("SOLVER.EVAL_PERIOD", 1, "evaluate every N epochs (and after the last)"),
    ("SOLVER.LOG_PERIOD", 20, "steps between progress-bar updates (the only host syncs of a step)"),
    ("SOLVER.MONITOR_METRIC_NAME", "centroid_mAP", "metric that picks best.pth (a metrics.jsonl key)"),
    ("SOLVER.MONITOR_METRIC_MODE", "max", "max | min"),
    ("SOLVER.SYNC_BN", False, "synchronise BatchNorm statistics across devices"),
    ("SOLVER.COMPILE", False, "torch.compile the model"),
    ("SOLVER.AMP_DTYPE", "fp16", "fp16 | bf16 for mixed precision"),
    ("SOLVER.AMP_BACKEND", "native", "native (torch.amp) | apex"),
    ("SOLVER.AMP_OPT_LEVEL", "O2", "apex opt level (with --SOLVER.AMP_BACKEND apex)"),
    ("SOLVER.SEED", 0, "seed of the sampler, augmentation and initialisation"),
    ("TEST.IMS_PER_BATCH", 128, "images per device per evaluation batch"),
    ("TEST.FEAT_NORM", True, "L2-normalise embeddings before distances"),
    ("TEST.FLIP_FEATS", False, "average the embeddings of each image and its mirror"),
    ("TEST.MAX_RANK", 50, "length of the CMC curve"),
    ("TEST.CAMERA_AGNOSTIC", False, "no same-camera removal (single-camera data)"),
    ("USE_MIXED_PRECISION", True, "mixed precision on accelerators (--SOLVER.AMP_DTYPE; CPU runs fp32)"),
    ("OUTPUT_DIR", "output", "where metrics.jsonl, last.pth and best.pth go"),
]


CHOICES = {"MODEL.DEVICE": ("auto", "npu", "cuda", "cpu"), "SOLVER.AMP_DTYPE": ("fp16", "bf16"),
           "SOLVER.AMP_BACKEND": ("native", "apex"), "SOLVER.DISTANCE_FUNC": ("euclidean", "cosine"),
           "SOLVER.MONITOR_METRIC_MODE": ("max", "min"), "SOLVER.OPTIMIZER_NAME": ("Adam", "AdamW", "SGD")}


def str2bool(text):
    """true/false/1/0/yes/no in any case."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")


def list_of(item_type):
    """Parse list values given as `256 128`, `256,128` or `[256, 128]` (the original's yacs style)."""
    def parse(text):
        parts = str(text).strip("[]() ").replace(",", " ").split()
        return [item_type(p.strip("'\"")) for p in parts]
    return parse


class FlagParser(argparse.ArgumentParser):
    """argparse that names the closest valid flags when one is unknown."""

    def error(self, message):
        self.print_usage(sys.stderr)
        unknown = [w.split("=")[0] for w in message.split() if w.startswith("--")]
        names = [s for a in self._actions for s in a.option_strings]
        hints = [f"{u}: did you mean {' or '.join(difflib.get_close_matches(u, names, n=3, cutoff=0.5))}?"
                 for u in unknown if difflib.get_close_matches(u, names, n=3, cutoff=0.5)]
        self.exit(2, f"{self.prog}: error: {message}\n" + "".join(h + "\n" for h in hints))


def get_args_parser(add_help=True):
    """The one parser of train.py (evaluate.py and the tools reuse it)."""
    parser = FlagParser(description="Train a centroid-triplet ReID model.", add_help=add_help,
                        allow_abbrev=False)
    for name, default, help_text in FLAGS:
        kwargs = {"dest": name, "default": default, "help": f"{help_text} (default: {default})"}
        if isinstance(default, bool):
            kwargs.update(type=str2bool, metavar="BOOL")
        elif isinstance(default, list):
            kwargs.update(type=list_of(str if name == "DATASETS.NAMES" else int), nargs="+", action=Extend)
        else:
            kwargs["type"] = type(default)
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        parser.add_argument("--" + name, **kwargs)
    parser.add_argument("--resume", default="", help="auto (OUTPUT_DIR/last.pth if present) or a checkpoint path")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by torch.distributed.launch")
    return parser


class Extend(argparse.Action):
    """Flatten list values (`--INPUT.SIZE_TRAIN 256 128` or `[256,128]`) and replace the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for part in values for v in part])


def normalise_argv(argv, parser):
    """Accept the original's `KEY VALUE` overrides and `--KEY=VALUE`: turn bare known keys into flags."""
    keys = {s[2:].upper(): s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    out = []
    for token in argv:
        bare = token.split("=")[0]
        if not token.startswith("-") and bare.upper() in keys and "/" not in token:
            token = keys[bare.upper()] + token[len(bare):]
        out.append(token)
    return out


def parse_args(argv=None, parser=None):
    """Parse flags (and `KEY VALUE` overrides) into a namespace whose attributes are the dotted names."""
    parser = parser or get_args_parser()
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(normalise_argv(argv, parser))


def config_dict(args):
    """The configuration as a plain dict of flag name -> value (stored in checkpoints)."""
    return {k: v for k, v in vars(args).items() if k != "local_rank"}


def lr_factor(epoch, warmup_epochs, steps, gamma):
    """Warm-up then step decay: (epoch+1)/warmup during warm-up, gamma^(milestones passed) after."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return gamma ** sum(epoch >= s for s in steps)


def build_optimizers(args, model, center_loss):
    """The model's optimizer, the center loss's SGD, and the per-epoch lr schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = getattr(args, "SOLVER.OPTIMIZER_NAME").lower()
    lr, wd = getattr(args, "SOLVER.BASE_LR"), getattr(args, "SOLVER.WEIGHT_DECAY")
    if name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    elif name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=getattr(args, "SOLVER.MOMENTUM"))
    else:
        raise SystemExit(f"--SOLVER.OPTIMIZER_NAME {name!r}: expected Adam, AdamW or SGD")
    center_optimizer = build_center_optimizer(center_loss, lr=getattr(args, "SOLVER.CENTER_LR"))
    warmup, steps, gamma = (getattr(args, k) for k in ("SOLVER.WARMUP_EPOCHS", "SOLVER.STEPS", "SOLVER.GAMMA"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, warmup, steps, gamma))
    return optimizer, center_optimizer, scheduler


# ---------------------------------------------------------------------------------------------------
# The training step and epoch

STOP = {"signal": None}


def request_stop(signum, frame):
    """First SIGINT/SIGTERM: finish the step and save; a second one exits at once."""
    if STOP["signal"] is not None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    STOP["signal"] = signum
    print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pth "
          "(send it again to quit at once)", file=sys.stderr, flush=True)


def backward_and_step(total, optimizers, scaler, apex_amp, center_loss, center_weight):
    """Backward through the (scaled) loss, rescale the center grads, step both optimizers."""
    optimizer, center_optimizer = optimizers
    if apex_amp is not None:
        with apex_amp.scale_loss(total, [optimizer, center_optimizer]) as scaled:
            scaled.backward()
    else:
        scaler.scale(total).backward()
        scaler.unscale_(center_optimizer)  # the center grads must be rescaled unscaled
    scale_center_grads(center_loss, center_weight)
    scaler.step(optimizer)
    scaler.step(center_optimizer)
    scaler.update()


def agree(device, first_bad_step):
    """(stop requested on any rank, first non-finite step on any rank or -1): one small collective."""
    stop = float(STOP["signal"] is not None)
    if not torch.distributed.is_initialized():
        return bool(stop), int(first_bad_step)
    t = torch.tensor([stop, float(first_bad_step)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t[0].item()), int(t[1].item())


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


def train_one_epoch(model, center_loss, loader, optimizers, scaler, apex_amp, args, device, epoch,
                    start_step, amp_dtype, world_size):
    """Train one epoch (from start_step); returns the epoch's mean losses and speed, and where it stopped."""
    model.train()
    K = getattr(args, "DATALOADER.NUM_INSTANCE")
    images_per_step = getattr(args, "SOLVER.IMS_PER_BATCH") * K * world_size
    log_period = max(1, getattr(args, "SOLVER.LOG_PERIOD"))
    channels_last = utils.memory_format(device)
    loss_kwargs = loss_arguments(args)
    sums = torch.zeros(5, device=device)  # total, centroid_triplet, triplet, xent, center
    first_bad = torch.tensor(-1, device=device)
    num_steps = len(loader.batch_sampler)
    bar = tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch + 1}", unit="step",
               disable=not utils.is_main_process(), dynamic_ncols=True, leave=False)
    done, data_time, stopped = 0, 0.0, False
    start = tick = time.perf_counter()
    for step, (images, pids, _) in enumerate(loader, start=start_step):
        data_time += time.perf_counter() - tick
        images = images.to(device, non_blocking=True, memory_format=channels_last)
        pids = pids.to(device, non_blocking=True)
        if step == start_step and world_size > 1:
            check_disjoint_identities(pids, world_size)
        with utils.autocast(device, amp_dtype):
            feat, logits = model(images)
        total, terms = compute_losses(feat.float(), logits.float(), pids, center_loss, K, **loss_kwargs)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        backward_and_step(total, optimizers, scaler, apex_amp, center_loss,
                          getattr(args, "SOLVER.CENTER_LOSS_WEIGHT"))
        loss_row = torch.stack([total.detach().float()] + [t.float() for t in terms.values()])
        sums += loss_row
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_row).all(), step, first_bad)
        done += 1
        bar.update(1)
        at_log = (step + 1) % log_period == 0 or step + 1 == num_steps
        if at_log or (world_size == 1 and STOP["signal"] is not None):
            stop, bad_step = agree(device, first_bad.item())  # the only host sync of a step
            if bad_step >= 0:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {bad_step + 1}: stopping; "
                                    "last.pth still holds the last good state (lower --SOLVER.BASE_LR, "
                                    "or try --SOLVER.AMP_DTYPE bf16)")
            if (step + 1) % log_period == 0:
                seconds = time.perf_counter() - start
                bar.set_postfix(loss=f"{sums[0].item() / done:.3f}", lr=f"{optimizers[0].param_groups[0]['lr']:.2e}",
                                img_s=f"{done * images_per_step / seconds:.1f}")
            if stop:
                stopped = True
                break
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


def loss_arguments(args):
    """compute_losses keyword arguments from the flags."""
    return {"margin": getattr(args, "SOLVER.MARGIN"), "distance": getattr(args, "SOLVER.DISTANCE_FUNC"),
            "label_smooth": getattr(args, "SOLVER.LABEL_SMOOTH"),
            "ctl_weight": getattr(args, "SOLVER.CENTROID_CONTRASTIVE_WEIGHT"),
            "triplet_weight": getattr(args, "SOLVER.QUERY_CONTRASTIVE_WEIGHT"),
            "xent_weight": getattr(args, "SOLVER.QUERY_XENT_WEIGHT"),
            "center_weight": getattr(args, "SOLVER.CENTER_LOSS_WEIGHT"), "check_layout": False}


# ---------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, the main loop

def extract_sharded(model, items, args, device, rank, world_size, amp_dtype):
    """Embed this rank's contiguous shard of items and gather all shards (in order) onto every rank."""
    start, end = utils.shard_bounds(len(items), rank, world_size)
    if start == end:  # more ranks than a shard needs (e.g. 5 items, 4 ranks): nothing to embed, still gather
        return utils.gather_rows(torch.zeros(0, model.feat_dim, device=device), len(items))
    loader = build_test_loader(items[start:end], getattr(args, "INPUT.SIZE_TEST"),
                               getattr(args, "TEST.IMS_PER_BATCH"), getattr(args, "DATALOADER.NUM_WORKERS"))
    feats, _, _ = extract_features(model, loader, device, flip=getattr(args, "TEST.FLIP_FEATS"),
                                   feat_norm=getattr(args, "TEST.FEAT_NORM"), amp_dtype=amp_dtype)
    return utils.gather_rows(feats.to(device), len(items))  # metrics then run on the device too


def evaluate_epoch(model, data, args, device, rank, world_size, amp_dtype):
    """Per-image and centroid results (on rank 0; None elsewhere), features extracted on every rank."""
    utils.broadcast_buffers(model)  # every shard embedded by the model rank 0 saves
    q_feats = extract_sharded(model, data["query"], args, device, rank, world_size, amp_dtype)
    g_feats = extract_sharded(model, data["gallery"], args, device, rank, world_size, amp_dtype)
    if rank != 0:
        return None
    return evaluate_features(q_feats, *item_labels(data["query"]), g_feats, *item_labels(data["gallery"]),
                             **evaluation_arguments(args, data["has_cameras"]))


def evaluation_arguments(args, has_cameras):
    """evaluate_features keyword arguments from the flags (train.py and evaluate.py alike)."""
    return {"keep_camid_centroids": getattr(args, "MODEL.KEEP_CAMID_CENTROIDS") and has_cameras,
            "max_rank": getattr(args, "TEST.MAX_RANK"), "camera_agnostic": getattr(args, "TEST.CAMERA_AGNOSTIC"),
            "normalize_centroids": getattr(args, "TEST.FEAT_NORM")}


def flatten_results(results):
    """{'image': ..., 'centroid': ...} -> metrics.jsonl keys (fractions): mAP, rank1, ..., centroid_mINP."""
    row = {}
    for kind, prefix in (("image", ""), ("centroid", "centroid_")):
        res = results[kind]
        row.update({f"{prefix}mAP": float(res["mAP"]), f"{prefix}mINP": float(res["mINP"])})
        row.update({f"{prefix}rank{k}": float(res["cmc"][k - 1]) for k in (1, 5, 10) if k <= len(res["cmc"])})
    return row


def rng_state():
    """Python, numpy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state):
    """Restore what rng_state saved."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])


def checkpoint(model, center_loss, optimizers, scheduler, scaler, args, next_epoch, next_step, best_metric, sampler):
    """Everything needed to evaluate the model or continue the exact schedule."""
    return {"model": model.state_dict(), "center_loss": center_loss.state_dict(),
            "optimizer": optimizers[0].state_dict(), "center_optimizer": optimizers[1].state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": next_epoch - 1, "next_epoch": next_epoch, "next_step": next_step,
            "best_metric": best_metric, "config": config_dict(args),
            "model_name": getattr(args, "MODEL.NAME"), "num_classes": model.num_classes,
            "last_stride": getattr(args, "MODEL.LAST_STRIDE"), "stem_relu": model.stem_relu,
            "sampler": sampler.state_dict(), "rng": rng_state()}


def resume(path, model, center_loss, optimizers, scheduler, scaler, sampler):
    """Load a checkpoint written by checkpoint(); returns (next_epoch, next_step, best_metric)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    center_loss.load_state_dict(state["center_loss"])
    optimizers[0].load_state_dict(state["optimizer"])
    optimizers[1].load_state_dict(state["center_optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    print(f"resumed from {path}: epoch {state['next_epoch'] + 1}, step {state['next_step']}, "
          f"lr {optimizers[0].param_groups[0]['lr']:.2e}")
    return state["next_epoch"], state["next_step"], state["best_metric"]


def resolve_resume(value, output_dir):
    """--resume auto -> OUTPUT_DIR/last.pth when it exists; a path must exist."""
    if not value:
        return ""
    if value == "auto":
        path = os.path.join(output_dir, "last.pth")
        return path if os.path.exists(path) else ""
    if not os.path.exists(value):
        raise SystemExit(f"--resume {value}: no such file (use --resume auto to continue from OUTPUT_DIR/last.pth)")
    return value


def is_better(value, best, mode):
    """Whether a monitored metric improved."""
    return best is None or (value > best if mode == "max" else value < best)


def setup_apex(model, optimizers, args):
    """apex.amp.initialize when --SOLVER.AMP_BACKEND apex and apex is installed; a clear exit when not."""
    try:
        from apex import amp as apex_amp
    except ImportError:
        raise SystemExit("--SOLVER.AMP_BACKEND apex: apex is not installed. On Ascend install Ascend's apex "
                         "fork; elsewhere use --SOLVER.AMP_BACKEND native (torch.amp), which needs nothing extra.")
    model, optimizers = apex_amp.initialize(model, list(optimizers), opt_level=getattr(args, "SOLVER.AMP_OPT_LEVEL"),
                                            loss_scale="dynamic")
    return model, optimizers, apex_amp


def build_everything(args, device, rank, world_size):
    """Data, sampler/loader, model, center loss, optimizers, schedule and scaler from the flags."""
    data = build_datasets(getattr(args, "DATASETS.NAMES"), getattr(args, "DATASETS.ROOT_DIR"))
    P, K = getattr(args, "SOLVER.IMS_PER_BATCH"), getattr(args, "DATALOADER.NUM_INSTANCE")
    loader_args = (data["train"], P, K, getattr(args, "INPUT.SIZE_TRAIN"), getattr(args, "DATALOADER.NUM_WORKERS"))
    loader_kwargs = {"seed": getattr(args, "SOLVER.SEED"), "rank": rank, "world_size": world_size,
                     "flip_prob": getattr(args, "INPUT.PROB"), "padding": getattr(args, "INPUT.PADDING"),
                     "re_prob": getattr(args, "INPUT.RE_PROB")}
    if getattr(args, "INPUT.DEVICE_AUGMENT"):
        loader = DeviceAugmentLoader(*loader_args, device, **loader_kwargs)
        sampler = loader.batch_sampler
    else:
        loader, sampler = build_train_loader(*loader_args, **loader_kwargs)
    pretrain_path = getattr(args, "MODEL.PRETRAIN_PATH")
    model = build_model(getattr(args, "MODEL.NAME"), data["num_train_pids"], getattr(args, "MODEL.LAST_STRIDE"),
                        pretrained=getattr(args, "MODEL.PRETRAINED") and not pretrain_path)
    emb_size = getattr(args, "MODEL.BACKBONE_EMB_SIZE")
    if emb_size and emb_size != model.feat_dim:
        raise SystemExit(f"--MODEL.BACKBONE_EMB_SIZE {emb_size}: {getattr(args, 'MODEL.NAME')} gives "
                         f"{model.feat_dim}-d features (leave it at 0 to follow the backbone)")
    center_loss = CenterLoss(data["num_train_pids"], model.feat_dim)
    if pretrain_path:  # our checkpoints and the original's also carry the center-loss centers
        load_weights(model, pretrain_path, center_loss=center_loss)
    model.to(device, memory_format=utils.memory_format(device))
    center_loss.to(device)
    optimizer, center_optimizer, scheduler = build_optimizers(args, model, center_loss)
    return data, loader, sampler, model, center_loss, [optimizer, center_optimizer], scheduler


def log_epoch(epoch, max_epochs, stats, lr, device):
    """One line per epoch: every loss term, lr, speed."""
    terms = " ".join(f"{k} {stats['loss_' + k]:.4f}" for k in LOSS_TERMS)
    print(f"epoch {epoch + 1}/{max_epochs}  loss {stats['loss']:.4f} ({terms})  lr {lr:.2e}  "
          f"{stats['images_per_s']:.1f} images/s ({device.type})  step {stats['step_time_s'] * 1000:.0f} ms "
          f"(waiting for data {stats['data_time_s'] * 1000:.0f} ms)", flush=True)


def main(argv=None):
    """Parse flags, build everything, train with per-epoch evaluation, write metrics and checkpoints."""
    args = parse_args(argv)
    device_type = utils.pick_device_type(getattr(args, "MODEL.DEVICE"))
    device, rank, world_size, _ = utils.init_distributed(device_type, getattr(args, "GPU_IDS"), args.local_rank)
    main_process = rank == 0
    if not main_process:
        sys.stdout = open(os.devnull, "w")  # one rank talks
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    torch.manual_seed(getattr(args, "SOLVER.SEED"))
    random.seed(getattr(args, "SOLVER.SEED") + rank)
    np.random.seed(getattr(args, "SOLVER.SEED") + rank)
    output_dir = getattr(args, "OUTPUT_DIR")
    os.makedirs(output_dir, exist_ok=True)
    try:
        data, loader, sampler, model, center_loss, optimizers, scheduler = build_everything(args, device, rank, world_size)
    except (DataError, WeightError) as err:
        raise SystemExit(f"error: {err}")
    P, K = getattr(args, "SOLVER.IMS_PER_BATCH"), getattr(args, "DATALOADER.NUM_INSTANCE")
    if P < 2:
        print("warning: --SOLVER.IMS_PER_BATCH 1 gives batches of one identity: the triplet and centroid "
              "triplet losses have no negatives and stay 0", file=sys.stderr)
    print(f"{P} identities x {K} images = {P * K} images per device, {world_size} device(s) "
          f"({device}) = {P * K * world_size} images per step; {len(sampler)} steps per epoch")
    amp_dtype, needs_scaler = utils.amp_settings(device.type, getattr(args, "USE_MIXED_PRECISION") and device.type != "cpu",
                                                 getattr(args, "SOLVER.AMP_DTYPE"))
    apex_amp = None
    if getattr(args, "SOLVER.AMP_BACKEND") == "apex":  # apex casts and scales itself
        model, optimizers, apex_amp = setup_apex(model, optimizers, args)
        amp_dtype, needs_scaler = None, False
    scaler = utils.make_grad_scaler(device, needs_scaler)
    print(f"precision: {'apex ' + getattr(args, 'SOLVER.AMP_OPT_LEVEL') if apex_amp else amp_dtype or 'fp32'}")
    next_epoch, next_step, best_metric = 0, 0, None
    resume_path = resolve_resume(args.resume, output_dir)
    if resume_path:
        next_epoch, next_step, best_metric = resume(resume_path, model, center_loss, optimizers, scheduler, scaler, sampler)
    train_model, train_center_loss = model, center_loss
    if world_size > 1:
        if getattr(args, "SOLVER.SYNC_BN"):
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        device_ids = [device.index] if device.type != "cpu" else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids)
        # the centers are learned too: their gradients must be averaged over the ranks like the model's
        train_center_loss = torch.nn.parallel.DistributedDataParallel(center_loss, device_ids=device_ids)
    if getattr(args, "SOLVER.COMPILE"):
        train_model = torch.compile(train_model)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    max_epochs = getattr(args, "SOLVER.MAX_EPOCHS")
    for epoch in range(next_epoch, max_epochs):
        sampler.set_epoch(epoch, start_step=next_step)
        try:
            stats, stopped_at = train_one_epoch(train_model, train_center_loss, loader, optimizers, scaler, apex_amp, args,
                                                device, epoch, next_step, amp_dtype, world_size)
        except NonFiniteLoss as err:
            raise SystemExit(f"error: {err}")
        if stopped_at is not None and stopped_at < len(sampler):  # mid-epoch: save where it stopped
            if main_process:
                utils.save_atomic(checkpoint(model, center_loss, optimizers, scheduler, scaler, args, epoch,
                                             stopped_at, best_metric, sampler), os.path.join(output_dir, "last.pth"))
            return stopped(f"epoch {epoch + 1}, step {stopped_at}", output_dir)
        next_step = 0
        best_metric = finish_epoch(epoch, stats, model, center_loss, optimizers, scheduler, scaler, sampler, data,
                                   args, device, rank, world_size, amp_dtype, best_metric)
        if stopped_at is not None:  # the signal came on the epoch's last step: the epoch is complete
            return stopped(f"the end of epoch {epoch + 1}", output_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def finish_epoch(epoch, stats, model, center_loss, optimizers, scheduler, scaler, sampler, data, args, device,
                 rank, world_size, amp_dtype, best_metric):
    """Log the epoch, evaluate when due, step the schedule, write metrics.jsonl and the checkpoints."""
    max_epochs, output_dir = getattr(args, "SOLVER.MAX_EPOCHS"), getattr(args, "OUTPUT_DIR")
    lr = optimizers[0].param_groups[0]["lr"]
    log_epoch(epoch, max_epochs, stats, lr, device)
    record = {"epoch": epoch + 1, "lr": lr, **stats}
    if (epoch + 1) % getattr(args, "SOLVER.EVAL_PERIOD") == 0 or epoch + 1 == max_epochs:
        results = evaluate_epoch(model, data, args, device, rank, world_size, amp_dtype)
        if rank == 0:
            print(format_results(results), flush=True)
            record.update(flatten_results(results))
    scheduler.step()
    if rank == 0:
        metric_name = getattr(args, "SOLVER.MONITOR_METRIC_NAME")
        improved = metric_name in record and is_better(record[metric_name], best_metric,
                                                       getattr(args, "SOLVER.MONITOR_METRIC_MODE"))
        best_metric = record[metric_name] if improved else best_metric
        state = checkpoint(model, center_loss, optimizers, scheduler, scaler, args, epoch + 1, 0, best_metric, sampler)
        utils.save_atomic(state, os.path.join(output_dir, "last.pth"))
        if improved:
            utils.save_atomic(state, os.path.join(output_dir, "best.pth"))
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    utils.barrier()
    return best_metric


def stopped(where, output_dir):
    """After SIGINT/SIGTERM: say where training stopped, leave the process group, exit code 128 + signal."""
    print(f"stopped at {where}: saved {output_dir}/last.pth (continue with --resume auto)", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 128 + STOP["signal"]


if __name__ == "__main__":
    sys.exit(main())
