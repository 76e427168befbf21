"""The checkpoint format, with one owner: what a training checkpoint holds and writing it (atomically, every rank's
random state gathered), the one torch.load of every file the tools read, what a weight file holds (ours, the
original centroids-reid's Lightning .ckpt, torchvision/IBN-a ImageNet weights, plain state dicts) in CTLModel's
keys with its metadata (architecture, stem, input size, normalisation), and the checks and loading of a resumed run.

    saved = training_checkpoint(state, cfg, next_epoch, next_step)    # train.py, at every save
    weights = read_weights(path)                                      # model.py: load_weights, model_from_checkpoint
    saved = read_training_checkpoint(path, "--resume auto", output_dir)

Files are read with torch.load(weights_only=True): a file cannot run code. The original's .ckpt pickles its yacs
configuration and Lightning's hyper-parameter dicts: those classes are read as plain OrderedDicts.
"""
import os
import random
import typing
from collections import OrderedDict

import numpy as np
import torch

from support import utils
from support.utils import UserError

# top-level modules whose pickled objects in a Lightning .ckpt are only configuration (yacs CfgNode, Lightning's
# AttributeDict, callback classes used as dict keys): read as plain OrderedDicts
_CONFIG_MODULES = ("yacs", "pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse",
                   "callbacks")
OURS, ORIGINAL, IMAGENET, STATE_DICT = "our checkpoint", "original centroids-reid checkpoint", "ImageNet weights", \
    "state dict"


class WeightError(UserError):
    """A weight file is missing, unreadable or does not fit the model."""


class ResumeError(UserError):
    """A checkpoint that cannot continue this run: the message says which key differs and what to do."""


def load(path, config_classes=()):
    """torch.load(path, weights_only=True) on the CPU: the one place a file of ours or a checkpoint is read.
    config_classes: names of pickled classes to read as OrderedDicts (a Lightning .ckpt's configuration)."""
    with torch.serialization.safe_globals([(OrderedDict, name) for name in config_classes]):
        return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------
# Weight files: any of the supported kinds, in CTLModel's keys

class WeightFile(typing.NamedTuple):
    """A weight file in CTLModel's keys: the tensors, the center-loss centers (or None), what kind of file it is,
    the keys left out (ImageNet classifiers), and the raw object for its metadata."""
    state: dict
    centers: object
    kind: str
    dropped: list
    raw: dict


def read_file(path):
    """A weight file's object, Lightning configuration objects read as OrderedDicts; WeightError if it is none."""
    try:
        return load(path)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError ... on bad files
        first_error = error
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  (not a zip of pickles at all)
        unsafe = []
    if not unsafe:
        raise WeightError(f"{path}: not a PyTorch weight file ({type(first_error).__name__}: "
                          f"{utils.first_line(first_error, 200) if str(first_error).strip() else ''})")
    foreign = [g for g in unsafe if g.split(".")[0] not in _CONFIG_MODULES]
    if foreign:
        raise WeightError(
            f"{path}: holds pickled Python objects that safe loading (weights_only=True) refuses: "
            f"{', '.join(foreign[:4])}. Save the weights as a state_dict instead, e.g. "
            f"torch.save(model.state_dict(), 'weights.pth') in the program that made the file")
    try:  # safe: an OrderedDict stands in for each configuration class, so no code from the file can run
        return load(path, unsafe)
    except Exception as error:  # noqa: BLE001
        raise WeightError(f"{path}: cannot read its configuration objects safely ({error})") from None


def read_weights(path):
    """WeightFile of any supported weight file; WeightError naming the file and what was expected."""
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise WeightError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if isinstance(obj.get("model"), dict):
        state, centers, kind = obj["model"], (obj.get("center_loss") or {}).get("centers"), OURS
    else:
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        centers, kind = None, STATE_DICT
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightError(f"{path}: {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    if any(k.startswith("backbone.base.") for k in state):
        return _original_weights(state, obj)
    if "conv1.weight" in state:  # torchvision / IBN-a ImageNet layout; their fc is ImageNet's classifier
        mapped = {"backbone." + k: v for k, v in state.items() if not k.startswith("fc.")}
        return WeightFile(mapped, None, IMAGENET, [k for k in state if k.startswith("fc.")], obj)
    if "backbone.conv1.weight" in state:
        return WeightFile(state, centers, kind, [], obj)
    raise WeightError(f"{path}: unknown key layout (first keys: {', '.join(list(state)[:3])}); expected "
                      f"torchvision/IBN-a ImageNet weights, our checkpoint or a centroids-reid .ckpt")


def _original_weights(state, obj):
    """An original centroids-reid .ckpt's state in CTLModel's keys (its fc_query is our classifier)."""
    mapped, dropped, centers = {}, [], None
    for k, v in state.items():
        if k.startswith("backbone.base.fc."):
            dropped.append(k)  # the IBN-a net's unused ImageNet classifier
        elif k == "center_loss.centers":
            centers = v
        elif k == "fc_query.weight":
            mapped["classifier.weight"] = v
        else:
            mapped[k.replace("backbone.base.", "backbone.", 1)] = v
    return WeightFile(mapped, centers, ORIGINAL, dropped, obj)


def stem_relu_of(weights):
    """Whether the file's net had a ReLU after the stem's bn1: recorded in ours (older ones, without the record,
    always had it), absent in the original's plain ResNets (its IBN-a nets keep it); None when the file cannot
    tell (ImageNet weights, plain state dicts)."""
    if weights.kind == OURS:
        return bool(weights.raw.get("stem_relu", True))
    if weights.kind == ORIGINAL:
        return "backbone.layer1.0.bn1.IN.weight" in weights.state
    return None


def recorded_architecture(weights):
    """(MODEL.NAME or None, MODEL.LAST_STRIDE) as the file records them: ours by name, the original's last stride
    in its hyper-parameters; None when the keys must tell."""
    if weights.kind == OURS and "model_name" in weights.raw:
        return weights.raw["model_name"], int(weights.raw.get("last_stride", 1))
    if weights.kind == ORIGINAL:
        try:
            return None, int(weights.raw["hyper_parameters"]["MODEL"]["LAST_STRIDE"])
        except (KeyError, TypeError, ValueError):
            return None, 1
    return None, 1


def _trained_input(raw, name):
    """A checkpoint's INPUT.<name>: ours keep it in config, the original's in hyper_parameters."""
    if isinstance(raw.get("config"), dict):
        return raw["config"][f"INPUT.{name}"]
    return raw["hyper_parameters"]["INPUT"][name]


def trained_inputs(weights):
    """(INPUT.SIZE_TEST [H, W], INPUT.PIXEL_MEAN, INPUT.PIXEL_STD) the checkpoint's model was tested and trained
    with; None for each the file does not record."""
    recorded = []
    for name, kind in (("SIZE_TEST", int), ("PIXEL_MEAN", float), ("PIXEL_STD", float)):
        try:
            recorded.append(tuple(kind(v) for v in _trained_input(weights.raw, name)))
        except (KeyError, TypeError, ValueError):
            recorded.append(None)
    return recorded


# ---------------------------------------------------------------------------------------------------
# Training checkpoints: what train.py writes, and the random states every rank saves

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


def training_checkpoint(state, cfg, next_epoch, next_step):
    """Everything needed to evaluate the model or continue the exact schedule (state: train.TrainState)."""
    return {"model": state.model.state_dict(), "center_loss": state.center_loss.state_dict(),
            "optimizer": state.optimizer.state_dict(), "center_optimizer": state.center_optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "epoch": next_epoch - 1, "next_epoch": next_epoch, "next_step": next_step,
            "best_metric": state.best_metric, "config": cfg.flat(),
            "model_name": cfg.MODEL.NAME, "num_classes": state.model.num_classes,
            "last_stride": cfg.MODEL.LAST_STRIDE, "stem_relu": state.model.stem_relu,
            "sampler": state.sampler.state_dict(), "rng": rng_state()}


def write(saved, paths):
    """Write saved to each path atomically (utils.save_atomic); returns (path, OSError) of the first write that
    failed (the files it would have replaced stay as they were), or None."""
    for path in paths:
        try:
            utils.save_atomic(saved, path)
        except OSError as err:
            return path, err
    return None


def checkpoint_bytes(state):
    """An upper bound of a checkpoint's size: weights and buffers, and two optimizer moments per weight."""
    tensors = list(state.model.state_dict().values()) + list(state.center_loss.state_dict().values())
    return 3 * sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


# ---------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, whether it belongs to this run, and loading it

NEW_RUN_ADVICE = "or train from its weights in a new OUTPUT_DIR with --MODEL.PRETRAIN_PATH {path}"
RESUME_KEYS = (("DATASETS.NAMES", "another data set"), ("MODEL.NAME", "another backbone"),
               ("SOLVER.IMS_PER_BATCH", "another P: every epoch's batches differ"),
               ("DATALOADER.NUM_INSTANCE", "another K: every epoch's batches differ"),
               ("DATALOADER.SAMPLER", "another sampler: every epoch's batches differ"),
               ("SOLVER.OPTIMIZER_NAME", "another optimizer: its saved state does not apply"))
# What a resumed run takes from the configuration rather than from the checkpoint's optimizer and scheduler state
# (which would otherwise bring back the old values unsaid); the resume note names each that changed.
APPLIED_ON_RESUME = ("SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.MOMENTUM", "SOLVER.CENTER_LR",
                     "SOLVER.LR_SCHEDULER_NAME", "SOLVER.LR_STEPS", "SOLVER.GAMMA", "SOLVER.USE_WARMUP_LR",
                     "SOLVER.WARMUP_EPOCHS", "SOLVER.MIN_LR")


def resume_path(value, cfg):
    """--resume auto -> OUTPUT_DIR/last.pth when it exists; best -> OUTPUT_DIR/best.pth; a path must exist.
    MODEL.RESUME_TRAINING resumes MODEL.PRETRAIN_PATH, as the original does. '' when there is nothing to resume."""
    if not value and cfg.MODEL.RESUME_TRAINING:
        if not cfg.MODEL.PRETRAIN_PATH:
            raise UserError("MODEL.RESUME_TRAINING True needs MODEL.PRETRAIN_PATH: the checkpoint to continue")
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


def read_training_checkpoint(path, value, output_dir):
    """The training checkpoint at path; ResumeError when it is unreadable, damaged (truncated) or only weights."""
    try:
        saved = load(path)
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


def shown(value):
    """A key's value as typed on the command line (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_fits(saved, path, cfg, num_classes, world_size):
    """ResumeError naming the first key that makes the checkpoint another run; a note for a changed MAX_EPOCHS."""
    old = saved.get("config") or {}
    for key, what in RESUME_KEYS:
        if key in old and _as_saved(old[key]) != cfg[key] and not (
                key == "DATASETS.NAMES" and [n.lower() for n in old[key]] == [n.lower() for n in cfg[key]]):
            was = shown(old[key])
            raise ResumeError(f"--resume {path}: {key} is {was} in the checkpoint but {shown(cfg[key])} now "
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


def resume(saved, state, path, cfg, lr_at, rank=0):
    """Load a checkpoint written by training_checkpoint into state (train.TrainState): weights, optimizers,
    schedule, sampler, position and this rank's random state. The optimizers keep the configuration's settings
    (apply_settings; lr_at(epoch): the schedule's lr factor). ResumeError when its tensors do not fit the model."""
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                for opt in state.optimizers]  # what the configuration asks for, before the saved state replaces it
    try:
        for module, key in ((state.model, "model"), (state.center_loss, "center_loss"), (state.optimizer, "optimizer"),
                            (state.center_optimizer, "center_optimizer"), (state.scheduler, "scheduler"),
                            (state.scaler, "scaler"), (state.sampler, "sampler")):
            module.load_state_dict(saved[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise ResumeError(f"--resume {path}: the checkpoint does not fit the model built now "
                          f"({utils.first_line(err)}): {NEW_RUN_ADVICE.format(path=path)}") from None
    apply_settings(state, settings, lr_at)
    rng = saved["rng"]  # one state per rank since distributed runs save every rank's; a dict before
    set_rng_state(rng[rank if rank < len(rng) else 0] if isinstance(rng, list) else rng)
    state.next_epoch, state.next_step, state.best_metric = saved["next_epoch"], saved["next_step"], saved["best_metric"]
    print(f"resumed from {path}: epoch {state.next_epoch + 1}, step {state.next_step}, "
          f"lr {state.optimizer.param_groups[0]['lr']:.2e}")
    changed = [f"{key} was {shown(saved['config'][key])}, now {shown(cfg[key])}" for key in APPLIED_ON_RESUME
               if key in saved.get("config", {}) and _as_saved(saved["config"][key]) != cfg[key]]
    if changed:
        print(f"note: --resume {path}: {'; '.join(changed)}: applied from here on (the optimizers' moments and "
              "the position in the schedule are the checkpoint's)")


def apply_settings(state, settings, lr_at):
    """Give the loaded optimizers the configuration's settings (lr, weight decay, momentum ...) and the scheduler
    its base lr, then set each lr where the schedule stands (LambdaLR: base lr x lr_at of its epoch)."""
    for opt, groups in zip(state.optimizers, settings):
        for group, wanted in zip(opt.param_groups, groups):
            group.update(wanted)
    scheduler = state.scheduler
    scheduler.base_lrs = [group["initial_lr"] for group in state.optimizer.param_groups]
    for group, base in zip(state.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_at(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in state.optimizer.param_groups]  # what get_last_lr() reports
